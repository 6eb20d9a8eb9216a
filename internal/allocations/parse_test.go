package allocations

import (
	"encoding/json"
	"strings"
	"testing"
)

// The 400 bodies are pydantic's error lists, as aleph-vm answers them
// (tests/supervisor/test_views.py test_allocation_fails_on_invalid_item_hash).
func TestParseErrors(t *testing.T) {
	hash := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		body string
		want string // JSON of the errors; "" = valid
	}{
		{`{"persistent_vms": ["not-an-ItemHash"]}`,
			`[{"type":"value_error","loc":["persistent_vms",0],"msg":"Value error, Could not determine hash type: 'not-an-ItemHash'","input":"not-an-ItemHash","ctx":{"error":"Could not determine hash type: 'not-an-ItemHash'"}}]`},
		{`{"instances": [1]}`,
			`[{"type":"string_type","loc":["instances",0],"msg":"Input should be a valid string","input":1}]`},
		{`{"persistent_vms": null}`,
			`[{"type":"set_type","loc":["persistent_vms"],"msg":"Input should be a valid set","input":null}]`},
		{`[]`, `[{"type":"model_type","loc":[],"msg":"Input should be a valid dictionary or instance of Allocation","input":[]}]`},
		{`{"persistent_vms": ["` + hash + `", "` + hash + `"], "on_demand_vms": null, "jobs": null, "other": 1}`, ""},
		{`{}`, ""},
	} {
		a, errs := Parse([]byte(tc.body))
		if tc.want == "" {
			if len(errs) > 0 || a.PersistentVMs == nil || a.Instances == nil {
				t.Errorf("%s: %v, %+v", tc.body, errs, a)
			}
			continue
		}
		got, _ := json.Marshal(errs)
		if string(got) != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.body, got, tc.want)
		}
	}
	a, _ := Parse([]byte(`{"persistent_vms": ["` + hash + `", "` + hash + `"]}`))
	if len(a.PersistentVMs) != 1 {
		t.Errorf("duplicates kept: %v", a.PersistentVMs)
	}
	if _, errs := Parse([]byte(`{"persistent_vms": [`)); len(errs) != 1 || errs[0].Type != "json_invalid" {
		t.Errorf("truncated JSON: %+v", errs)
	}
}
