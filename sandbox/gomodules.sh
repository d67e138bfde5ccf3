# Shared by the sandbox's Go builds (sourced, not run): download a module's pinned dependencies
# and turn the Go module proxy refusing one of them into ONE clear line.
#
#   . "$(dirname "${BASH_SOURCE[0]}")/../gomodules.sh"
#   swi_go_mod_download DIR      # the directory holding go.mod; exits 1 on failure
#
# go prints a refusal as `go: M@V: reading https://proxy/.../V.zip: 403 Forbidden` somewhere
# among many lines; a build script then stops with
#   error: go module M@V was refused by the module proxy (403 Forbidden): pin a version the proxy serves in DIR/go.mod
# Any other download failure prints go's own last line after "error:".

swi_go_mod_download() {
  local dir=$1 log rc=0 refused
  log=$(mktemp)
  (cd "$dir" && go mod download) >/dev/null 2>"$log" || rc=$?
  if [ "$rc" -ne 0 ]; then
    # "M@V: reading URL: 403 Forbidden" (also 404 Not Found / 410 Gone from a proxy that hides it).
    refused=$(sed -n 's/^\(go: \)\{0,1\}\([^@[:space:]]*\)@\([^:[:space:]]*\): reading [^[:space:]]*: \([0-9][0-9][0-9][^:]*\)$/\2@\3 (\4)/p' "$log" | head -n 1)
    if [ -n "$refused" ]; then
      echo "error: go module ${refused% (*} was refused by the module proxy (${refused##* (}: pin a version the proxy serves in $dir/go.mod" >&2
    else
      echo "error: downloading the Go modules of $dir/go.mod failed: $(grep -v '^#\|^go: downloading\|^mkdir\|^cd\|^git\|^curl' "$log" | tail -n 1)" >&2
    fi
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}
