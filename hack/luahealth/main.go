// luahealth runs an Argo CD resource health check (health.lua) the way Argo CD does:
// under gopher-lua, with only the libraries Argo CD opens (package, base, table; no
// string, io or os), the object as the global `obj`, a one-second time limit, and the
// returned table's status checked against Argo CD's health codes.
//
// Usage: luahealth SCRIPT < objects.jsonl
// Reads one JSON object per line and writes one JSON line per object:
// {"status": "...", "message": "..."} or {"error": "..."}.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
)

var validStatus = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true,
	"Suspended": true, "Missing": true, "Unknown": true,
}

// toLua converts decoded JSON as Argo CD's decodeValue does.
func toLua(l *lua.LState, v any) lua.LValue {
	switch x := v.(type) {
	case map[string]any:
		t := l.NewTable()
		for k, e := range x {
			t.RawSetString(k, toLua(l, e))
		}
		return t
	case []any:
		t := l.NewTable()
		for i, e := range x {
			t.RawSetInt(i+1, toLua(l, e))
		}
		return t
	case float64:
		return lua.LNumber(x)
	case string:
		return lua.LString(x)
	case bool:
		return lua.LBool(x)
	default:
		return lua.LNil
	}
}

func run(script string, obj map[string]any) (map[string]string, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj))
	if err := l.DoString(script); err != nil {
		return nil, err
	}
	ret, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return nil, fmt.Errorf("health script returned %s, not a table", l.Get(-1).Type())
	}
	status := ret.RawGetString("status").String()
	if !validStatus[status] {
		return nil, fmt.Errorf("invalid health status %q", status)
	}
	out := map[string]string{"status": status}
	if msg, ok := ret.RawGetString("message").(lua.LString); ok {
		out["message"] = string(msg)
	}
	return out, nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: luahealth SCRIPT < objects.jsonl")
		os.Exit(2)
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 16<<20)
	out := json.NewEncoder(os.Stdout)
	for line := 1; in.Scan(); line++ {
		var obj map[string]any
		var result any
		if err := json.Unmarshal(in.Bytes(), &obj); err != nil {
			result = map[string]string{"error": fmt.Sprintf("line %d: %v", line, err)}
		} else if res, err := run(string(script), obj); err != nil {
			result = map[string]string{"error": err.Error()}
		} else {
			result = res
		}
		if err := out.Encode(result); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
