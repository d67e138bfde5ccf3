{{/* One operator per cluster: fixed names, the same as deploy/ uses. */}}
{{- define "swi.name" -}}
{{- .Values.fullnameOverride | default "sql-workload-identity-operator" | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "swi.labels" -}}
app.kubernetes.io/name: {{ include "swi.name" . }}
app.kubernetes.io/part-of: sql-workload-identity-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "swi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "swi.name" . }}
{{- end -}}

{{- define "swi.tenantId" -}}
{{- required "identity.tenantId is required: the tenant of the operator's own app registration" .Values.identity.tenantId -}}
{{- end -}}

{{- define "swi.clientId" -}}
{{- required "identity.clientId is required: the client id of the operator's own app registration" .Values.identity.clientId -}}
{{- end -}}

{{/* The Secret the webhook server's certificate is mounted from; empty: self-managed. */}}
{{- define "swi.webhookTlsSecret" -}}
{{- if .Values.webhook.tls.certManager.enabled -}}
{{- .Values.webhook.tls.secretName | default (printf "%s-webhook-cert" (include "swi.name" .)) -}}
{{- else -}}
{{- .Values.webhook.tls.secretName -}}
{{- end -}}
{{- end -}}

{{/* A webhook configuration's annotations: its values', plus cert-manager's CA injection. */}}
{{- define "swi.webhookAnnotations" -}}
{{- $root := index . 0 -}}
{{- $annotations := deepCopy (index . 1 | default dict) -}}
{{- if $root.Values.webhook.tls.certManager.enabled -}}
{{- $_ := set $annotations "cert-manager.io/inject-ca-from" (printf "%s/%s-webhook" $root.Release.Namespace (include "swi.name" $root)) -}}
{{- end -}}
{{- with $annotations -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* The operator's image: no public image is published, so the repository is the user's. */}}
{{- define "swi.image" -}}
{{- $repository := required "image.repository is required: the registry path you pushed the operator image to (none is published), e.g. myregistry.azurecr.io/sql-workload-identity-operator" .Values.image.repository -}}
{{- printf "%s:%s" $repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
