// Command gitops-health reads a Kubernetes resource as JSON on stdin and prints, as one JSON line
// {"status": ..., "message": ...}, how a GitOps tool judges its health:
//
//	gitops-health kstatus            < resource.json   # kstatus (Flux, cli-utils waiters)
//	gitops-health argocd SCRIPT.lua  < resource.json   # an Argo CD Lua health check
//
// kstatus is sigs.k8s.io/cli-utils' own status.Compute, pinned in go.mod. The Lua script runs the
// way Argo CD runs a health customization from argocd-cm: github.com/yuin/gopher-lua at the
// version Argo CD pins, the standard libraries left closed (resource.customizations.useOpenLibs is
// false by default) except package, base and table, the resource in the global `obj` (JSON
// numbers as Lua numbers, arrays as 1-based tables), a one-second limit, and the script's returned
// table read for `status` (Healthy, Progressing, Degraded, Suspended, Missing or Unknown; anything
// else is Unknown with Argo CD's "invalid health status" message) and `message`.
//
// The sandbox's tests use it (sandbox.tools.gitops_health_binary builds it once and caches it).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Args[1:], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "gitops-health:", err)
		os.Exit(1)
	}
}

func run(args []string, in io.Reader, out io.Writer) error {
	if len(args) == 0 || (args[0] == "kstatus" && len(args) != 1) || (args[0] == "argocd" && len(args) != 2) {
		return errors.New("usage: gitops-health kstatus | gitops-health argocd SCRIPT.lua (resource JSON on stdin)")
	}
	raw, err := io.ReadAll(in)
	if err != nil {
		return fmt.Errorf("reading stdin: %w", err)
	}
	// The apimachinery decoder keeps JSON integers as int64, as a client reading the API server
	// does (kstatus reads metadata.generation and status.observedGeneration as int64).
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(raw); err != nil {
		return fmt.Errorf("stdin is not a Kubernetes object in JSON: %w", err)
	}
	var v verdict
	switch args[0] {
	case "kstatus":
		res, err := status.Compute(obj)
		if err != nil {
			return fmt.Errorf("kstatus: %w", err)
		}
		v = verdict{Status: res.Status.String(), Message: res.Message}
	case "argocd":
		script, err := os.ReadFile(args[1])
		if err != nil {
			return err
		}
		v, err = argoHealth(obj.Object, string(script))
		if err != nil {
			return fmt.Errorf("argocd health script: %w", err)
		}
	default:
		return fmt.Errorf("unknown mode %q: kstatus or argocd", args[0])
	}
	return json.NewEncoder(out).Encode(v)
}

var argoStatuses = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true, "Missing": true, "Unknown": true,
}

func argoHealth(obj map[string]any, script string) (verdict, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return verdict{}, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj))
	if err := l.DoString(script); err != nil {
		return verdict{}, err
	}
	table, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return verdict{}, fmt.Errorf("expect table output from Lua script, not %s", l.Get(-1).Type())
	}
	var v verdict
	for field, dest := range map[string]*string{"status": &v.Status, "message": &v.Message} {
		switch value := table.RawGetString(field).(type) {
		case lua.LString:
			*dest = string(value)
		case *lua.LNilType:
		default:
			return verdict{}, fmt.Errorf("hs.%s is a %s, not a string", field, value.Type())
		}
	}
	if !argoStatuses[v.Status] {
		return verdict{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return v, nil
}

// toLua converts a decoded JSON value: objects to tables keyed by name, arrays to sequences.
func toLua(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case int64:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case []any:
		arr := l.CreateTable(len(v), 0)
		for _, item := range v {
			arr.Append(toLua(l, item))
		}
		return arr
	case map[string]any:
		tbl := l.CreateTable(0, len(v))
		for key, item := range v {
			tbl.RawSetString(key, toLua(l, item))
		}
		return tbl
	default:
		return lua.LNil
	}
}
