#!/usr/bin/env bash
# End-to-end smoke test of a built swi-controlplane + kubectl.
#
#   sandbox/controlplane/smoke_test.sh BINDIR
#
# BINDIR holds swi-controlplane and kubectl (from build.sh). Needs openssl, curl,
# python3 and ss. Uses only loopback; leaves nothing running; prints one
# PASS/FAIL line per check and "N passed, N failed" at the end.
set -uo pipefail

bin=$(cd "${1:?usage: $0 BINDIR}" && pwd)
cp=$bin/swi-controlplane
k=$bin/kubectl
work=$(mktemp -d /tmp/swi-cp-smoke.XXXXXX)
pass=0
failn=0
pids=()

ok() { echo "PASS: $*"; pass=$((pass + 1)); }
bad() { echo "FAIL: $*"; failn=$((failn + 1)); }
check() { local what=$1; shift; if "$@" >/dev/null 2>&1; then ok "$what"; else bad "$what"; fi; }

cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$(now) - $1:.1f}')"; }

# start NAME DIR [extra args]: starts an instance in the background.
start() {
  local name=$1 dir=$2; shift 2
  "$cp" --state-dir "$dir" --ca-cert "$work/ca.crt" --ca-key "$work/ca.key" --log-file "$work/$name.log" "$@" \
    >"$work/$name.out" 2>"$work/$name.err" &
  eval "pid_$name=$!"
  pids+=("$!")
}
# wait_ready NAME: waits for the READY line (180 s), echoes seconds taken.
wait_ready() {
  local name=$1 t0=$2 i
  for i in $(seq 1 1800); do
    if grep -q '^READY ' "$work/$name.out" 2>/dev/null; then elapsed "$t0"; return 0; fi
    sleep 0.1
  done
  return 1
}
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" "$work/$1.out"; }
stop() {
  local name=$1 pid t0 rc
  pid=$(eval echo "\$pid_$name")
  t0=$(now)
  kill -TERM "$pid"
  wait "$pid"
  rc=$?
  echo "$name stopped in $(elapsed "$t0") s, exit $rc"
  [ "$rc" = 0 ] && ok "$name: SIGTERM exits 0" || bad "$name: SIGTERM exit code $rc"
  if ss -ltnp 2>/dev/null | grep -q "pid=$pid,"; then bad "$name: ports left listening"; else ok "$name: no listening port left"; fi
  if kill -0 "$pid" 2>/dev/null; then bad "$name: process still alive"; else ok "$name: process gone"; fi
}

openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/ca.key" -out "$work/ca.crt" -days 30 \
  -subj "/CN=swi-smoke-ca" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# --- two instances at once -------------------------------------------------
t0=$(now)
start a "$work/a"
start b "$work/b" --feature-gates=ShardedListAndWatch=true
if ta=$(wait_ready a "$t0"); then ok "a: READY in ${ta}s (cold state dir, two starting at once)"; else bad "a: no READY"; cat "$work/a.err"; tail -30 "$work/a.log"; exit 1; fi
if tb=$(wait_ready b "$t0"); then ok "b: READY in ${tb}s"; else bad "b: no READY"; cat "$work/b.err"; exit 1; fi
cat "$work/a.out"
[ "$(wc -l <"$work/a.out")" = 1 ] && ok "a: exactly one stdout line" || bad "a: stdout has more than one line"
check "a and b use different servers" test "$(field a server)" != "$(field b server)"

export KUBECONFIG=$(field a kubeconfig)
server=$(field a server)
ca=$(field a ca)
check "a: files kubeconfig/issuer/apiserver.json" test -s "$work/a/kubeconfig" -a -s "$work/a/issuer" -a -s "$work/a/apiserver.json" -a -s "$work/a/sa.key"
check "a: issuer file matches READY" test "$(cat "$work/a/issuer")" = "$(field a issuer)"
check "a: kubectl get ns" "$k" get ns default
check "b: kubectl get ns" "$k" --kubeconfig "$(field b kubeconfig)" get ns default
# --feature-gates reaches the apiserver: b has the alpha ShardedListAndWatch gate.
kb=$(field b kubeconfig)
for i in $(seq 1 8); do "$k" --kubeconfig "$kb" create configmap "s$i" >/dev/null 2>&1; done
shard() { python3 -c "import urllib.parse,sys; print(urllib.parse.quote(\"shardRange(object.metadata.uid, '\"+sys.argv[1]+\"', '\"+sys.argv[2]+\"')\"))" "$1" "$2"; }
cnt() { "$k" --kubeconfig "$kb" get --raw "/api/v1/namespaces/default/configmaps?shardSelector=$(shard "$1" "$2")" | python3 -c 'import json,sys; print(len([i for i in json.load(sys.stdin)["items"] if i["metadata"]["name"].startswith("s")]))'; }
s0=$(cnt 0x0000000000000000 0x8000000000000000)
s1=$(cnt 0x8000000000000000 0x10000000000000000)
echo "b: shard 0 has $s0, shard 1 has $s1 of 8 configmaps"
check "b: --feature-gates=ShardedListAndWatch=true splits lists" test "$((s0 + s1))" = 8 -a "$s0" != 8 -a "$s1" != 8
check "a: server version v1.36.3" sh -c "'$k' version -o json | grep -q '\"gitVersion\": \"v1.36.3\"'"
check "a: create namespace" "$k" create ns smoke
check "a: create serviceaccount" "$k" -n smoke create sa app
tok=$("$k" -n smoke create token app --audience api://AzureADTokenExchange --duration 600s 2>/dev/null)
if [ -n "$tok" ]; then ok "a: TokenRequest for api://AzureADTokenExchange"; else bad "a: TokenRequest"; fi
claims=$(printf '%s' "$tok" | cut -d. -f2 | python3 -c 'import sys,base64,json; s=sys.stdin.read().strip(); print(json.dumps(json.loads(base64.urlsafe_b64decode(s+"="*(-len(s)%4)))))')
check "a: token aud/iss/sub" python3 -c "
import json,sys; c=json.loads('''$claims''')
assert c['aud']==['api://AzureADTokenExchange'], c
assert c['iss']=='$(field a issuer)', c
assert c['sub']=='system:serviceaccount:smoke:app', c
assert c['exp']-c['iat']>=600, c"
check "a: anonymous openid-configuration" sh -c "curl -fsS --cacert '$ca' '$server/.well-known/openid-configuration' | grep -q '\"issuer\":\"$(field a issuer)\"'"
check "a: anonymous jwks" sh -c "curl -fsS --cacert '$ca' '$server/openid/v1/jwks' | grep -q '\"kty\":\"RSA\"'"
check "a: anonymous list namespaces is 403" sh -c "test \"\$(curl -s -o /dev/null -w '%{http_code}' --cacert '$ca' '$server/api/v1/namespaces')\" = 403"
check "a: create deployment" "$k" -n smoke create deployment web --image=registry.invalid/web:1 --replicas=2
for i in $(seq 1 100); do
  n=$("$k" -n smoke get pods -l app=web --no-headers 2>/dev/null | wc -l)
  [ "$n" = 2 ] && break
  sleep 0.2
done
check "a: deployment made a ReplicaSet" sh -c "'$k' -n smoke get rs -l app=web --no-headers | grep -q web-"
check "a: ReplicaSet made 2 Pending pods" test "$n" = 2
check "a: pods carry projected SA token" sh -c "'$k' -n smoke get pods -l app=web -o jsonpath='{.items[0].spec.volumes[0].projected.sources[0].serviceAccountToken.path}' | grep -q token"
check "a: create job" "$k" -n smoke create job j1 --image=registry.invalid/j:1
for i in $(seq 1 50); do "$k" -n smoke get pods -l job-name=j1 --no-headers 2>/dev/null | grep -q j1- && break; sleep 0.2; done
check "a: job made a pod" sh -c "'$k' -n smoke get pods -l job-name=j1 --no-headers | grep -q j1-"
check "a: can-i as nobody is no" sh -c "test \"\$('$k' auth can-i --as nobody get pods -n smoke)\" = no"
check "a: get pods as nobody is Forbidden" sh -c "'$k' get pods -n smoke --as nobody 2>&1 | grep -q Forbidden"
check "a: keep a configmap across restart" "$k" create configmap keep --from-literal=k=v
check "a: keep a serviceaccount across restart" "$k" create sa keeper
keeptok=$("$k" create token keeper --audience api://AzureADTokenExchange --duration 600s 2>/dev/null)
t0=$(now)
if "$k" delete ns smoke --timeout=90s >/dev/null 2>&1 && ! "$k" get ns smoke >/dev/null 2>&1; then
  ok "a: namespace deletion finished in $(elapsed "$t0")s"
else
  bad "a: namespace deletion did not finish"
fi
rss=$(ps -o rss= -p "$pid_a")
echo "a: RSS $((rss / 1024)) MiB"

# --- refusals ----------------------------------------------------------------
"$cp" --state-dir "$work/a" --ca-cert "$work/ca.crt" --ca-key "$work/ca.key" >"$work/dup.out" 2>"$work/dup.err"
rc=$?
check "same state dir twice: exit 2 + error line" sh -c "test $rc = 2 && grep -q '^error: ' '$work/dup.err'"
"$cp" --state-dir "$work/c" --ca-cert "$work/a/kubeconfig" --ca-key "$work/ca.key" >"$work/badca.out" 2>"$work/badca.err"
rc=$?
check "bad CA: exit 2 + error line" sh -c "test $rc = 2 && grep -q '^error: ' '$work/badca.err'"
head -1 "$work/badca.err"

# --- stop, restart (state kept), crash recovery --------------------------------
# an open watch (like kopf's) must not stall the shutdown
"$k" get pods -A -w >/dev/null 2>&1 &
watcher=$!
sleep 1
t0=$(now)
stop a
check "a: stopped within 5 s with a watch open" python3 -c "assert $(elapsed "$t0") < 5"
kill "$watcher" 2>/dev/null
wait "$watcher" 2>/dev/null
stop b
t0=$(now)
start a2 "$work/a"
if ta=$(wait_ready a2 "$t0"); then ok "a2: restart READY in ${ta}s (warm state dir)"; else bad "a2: no READY after restart"; tail -30 "$work/a2.log"; exit 1; fi
check "a2: configmap kept across restart" "$k" get configmap keep
check "a2: same issuer after restart" test "$(field a2 issuer)" = "$(field a issuer)"
check "a2: pre-restart token still valid (TokenReview)" sh -c "'$k' create -o jsonpath='{.status.authenticated}' -f - <<EOF | grep -q true
apiVersion: authentication.k8s.io/v1
kind: TokenReview
spec:
  token: $keeptok
  audiences: [api://AzureADTokenExchange]
EOF"
kill -KILL "$pid_a2"
wait "$pid_a2" 2>/dev/null
t0=$(now)
start a3 "$work/a"
if ta=$(wait_ready a3 "$t0"); then ok "a3: READY after SIGKILL of previous run in ${ta}s"; else bad "a3: no READY after crash"; tail -30 "$work/a3.log"; exit 1; fi
check "a3: configmap kept after crash" "$k" get configmap keep
stop a3
check "no lock file left" test ! -e "$work/a/swi-controlplane.lock"

trap - EXIT
echo "$pass passed, $failn failed"
[ "$failn" = 0 ] && rm -rf "$work"
[ "$failn" = 0 ]
