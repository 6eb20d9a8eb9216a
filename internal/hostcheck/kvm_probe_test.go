package hostcheck

import "testing"

func TestProbeKVMMissingDevice(t *testing.T) {
	if err := ProbeKVM("/nonexistent/kvm"); err == nil {
		t.Fatal("probe of a missing device succeeded")
	}
}

func TestAutoPreference(t *testing.T) {
	cases := []struct {
		have []string
		want string
	}{
		{[]string{"kvm", "firecracker", "qemu", "runsc"}, "firecracker"},
		{[]string{"kvm", "qemu", "runsc"}, "qemu"},
		{[]string{"firecracker", "qemu", "runsc"}, "gvisor"}, // no KVM: no firecracker, no fast qemu
		{[]string{"qemu"}, "qemu"},
		{[]string{"kvm"}, ""},
	}
	for _, c := range cases {
		r := &Report{}
		for _, name := range []string{"kvm", "firecracker", "qemu", "runsc"} {
			ok := false
			for _, h := range c.have {
				ok = ok || h == name
			}
			r.Items = append(r.Items, Item{Name: name, OK: ok})
		}
		r.pick()
		if r.Backend != c.want {
			t.Errorf("with %v: picked %q, want %q", c.have, r.Backend, c.want)
		}
	}
}
