package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
)

// InstanceAction is definitions.InstanceActionInfo.
type InstanceAction struct {
	ActionType string `json:"action_type"`
}

// ActionSendCtrlAltDel asks the guest to shut down (x86 only). The guest
// sees the key press only if its kernel has the i8042 keyboard driver;
// kernels built without SERIO ignore it, and Stop then kills the VMM after
// its grace period — the pool has already stopped the program through the
// guest protocol by then.
const ActionSendCtrlAltDel = "SendCtrlAltDel"

// SendAction sends PUT /actions to Firecracker's API socket.
func SendAction(ctx context.Context, apiSocket, action string) error {
	return apiRequest(ctx, apiSocket, http.MethodPut, "/actions", InstanceAction{ActionType: action})
}

// PartialDrive is definitions.PartialDrive: what PATCH /drives/{id} may
// change after boot.
type PartialDrive struct {
	DriveID    string `json:"drive_id"`
	PathOnHost string `json:"path_on_host,omitempty"`
}

// PatchDrive sends PATCH /drives/{drive_id} (post-boot only): Firecracker
// opens the new backing file and tells the guest the disk changed.
func PatchDrive(ctx context.Context, apiSocket string, d PartialDrive) error {
	return apiRequest(ctx, apiSocket, http.MethodPatch, "/drives/"+url.PathEscape(d.DriveID), d)
}

// apiRequest sends one JSON request to Firecracker's API socket and
// expects 204 No Content (200 accepted too).
func apiRequest(ctx context.Context, apiSocket, method, path string, body any) error {
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", apiSocket)
		},
		DisableKeepAlives: true,
	}}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker API %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusOK {
		return fmt.Errorf("firecracker API %s %s: %s: %s", method, path, resp.Status, bytes.TrimSpace(msg))
	}
	return nil
}
