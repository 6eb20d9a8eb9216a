package alephapi

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// SettingsAggregate returns the "settings" aggregate of address (aleph-vm's
// SETTINGS_AGGREGATE_ADDRESS), as aleph-vm's fetch_aggregate_settings reads
// it: GET /api/v0/aggregates/ADDRESS.json?keys=settings, data.settings.
// Its keys are left raw for each reader (authorized_allocation_signers,
// compatible_gpus, community_wallet_address, ...). An address without it
// is an error, as upstream's raise_for_status makes it.
func (c *Client) SettingsAggregate(ctx context.Context, address string) (map[string]json.RawMessage, error) {
	if address == "" || strings.ContainsAny(address, "/?#%") {
		return nil, errkind.New(errkind.InvalidInput, "settings aggregate: invalid address %q", address)
	}
	u := c.base + "/api/v0/aggregates/" + url.PathEscape(address) + ".json?" + url.Values{"keys": {"settings"}}.Encode()
	var page struct {
		Data struct {
			Settings map[string]json.RawMessage `json:"settings"`
		} `json:"data"`
	}
	err := c.do(ctx, u, func(ctx context.Context, resp *http.Response) error {
		if err := json.NewDecoder(io.LimitReader(resp.Body, maxAggregateBody)).Decode(&page); err != nil {
			return errkind.Wrap(errkind.Upstream, fmt.Errorf("decoding %s: %w", redact(u), err))
		}
		return nil
	}, true)
	if err != nil {
		return nil, fmt.Errorf("settings aggregate of %s: %w", address, err)
	}
	return page.Data.Settings, nil
}
