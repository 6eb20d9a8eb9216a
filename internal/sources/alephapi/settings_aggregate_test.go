package alephapi

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
)

// TestSettingsAggregate reads the "settings" aggregate at the URL aleph-vm's
// fetch_aggregate_settings asks for, and an address without one as an
// error (upstream's raise_for_status).
func TestSettingsAggregate(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.RawQuery != "keys=settings" {
			t.Errorf("query %s: want keys=settings", r.URL.RawQuery)
		}
		switch r.URL.Path {
		case "/api/v0/aggregates/0xFba561a84A537fCaa567bb7A2257e7142701ae2A.json":
			_, _ = w.Write([]byte(`{"address":"0xFba561a84A537fCaa567bb7A2257e7142701ae2A","data":{"settings":{
				"compatible_gpus":[],"authorized_allocation_signers":["0x2937f62e5F81A88e921f883f8fE56ceCf4A4A44A"]}}}`))
		default:
			http.Error(w, `{"error":"Aggregate not found"}`, http.StatusNotFound)
		}
	}))
	defer srv.Close()
	c := New(srv.URL, "", WithRetries(1, 0))
	got, err := c.SettingsAggregate(context.Background(), "0xFba561a84A537fCaa567bb7A2257e7142701ae2A")
	if err != nil {
		t.Fatal(err)
	}
	var signers []string
	if err := json.Unmarshal(got["authorized_allocation_signers"], &signers); err != nil || len(signers) != 1 || signers[0] != "0x2937f62e5F81A88e921f883f8fE56ceCf4A4A44A" {
		t.Fatalf("settings %s: %v", got, err)
	}
	if _, err := c.SettingsAggregate(context.Background(), "0xnobody"); err == nil {
		t.Fatal("a missing aggregate is no error")
	}
}
