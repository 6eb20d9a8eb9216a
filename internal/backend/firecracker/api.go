package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
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
	body, err := json.Marshal(InstanceAction{ActionType: action})
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
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, "http://localhost/actions", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker API %s: %w", action, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusOK {
		return fmt.Errorf("firecracker API %s: %s: %s", action, resp.Status, bytes.TrimSpace(msg))
	}
	return nil
}
