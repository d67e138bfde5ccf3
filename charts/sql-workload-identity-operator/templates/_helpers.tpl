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
