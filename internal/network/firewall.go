package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The firewall is one nftables table of our own (family inet), never
// anyone else's: nothing here lists, flushes or edits other tables.
//
//	forward     (filter, hook forward): one jump per execution link to that
//	            execution's chain, then: anything else from our links is
//	            dropped; traffic to our links passes only as replies
//	            (established/related).
//	input       (filter, hook input): everything from our links to the
//	            host itself is dropped: the supervisor, SSH, Redis and every
//	            other listener, on every host address, gateways included.
//	postrouting (nat, hook postrouting): what leaves from our links is
//	            masqueraded behind the outgoing interface's address.
//	<link>      one regular chain per execution: replies pass; the
//	            execution's own source address only; the pool (other
//	            executions), link-local and loopback, multicast and
//	            reserved ranges are dropped; the operator's EGRESS_ALLOW
//	            ranges pass; private and shared ranges are dropped; the
//	            rest passes only towards NETWORK_INTERFACE.
//
// Base chains keep policy accept: they only judge packets of our links,
// so the host's other traffic is untouched.

// blockedRanges are never reachable from a program, whatever EGRESS_ALLOW
// says: they are the host's or nobody's.
var blockedRanges = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"), // link-local, cloud metadata
	netip.MustParsePrefix("224.0.0.0/4"),    // multicast
	netip.MustParsePrefix("240.0.0.0/4"),    // reserved, broadcast
}

// PrivateRanges are closed by default and opened one by one with
// EGRESS_ALLOW.
var PrivateRanges = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("100.64.0.0/10"), // shared address space (CGNAT)
}

type firewall struct {
	table      *nftables.Table
	linkPrefix string
}

func newFirewall(table, linkPrefix string) *firewall {
	return &firewall{
		table:      &nftables.Table{Name: table, Family: nftables.TableFamilyINet},
		linkPrefix: linkPrefix,
	}
}

func (fw *firewall) chain(name string) *nftables.Chain {
	return &nftables.Chain{Name: name, Table: fw.table}
}

// exists tells whether our table is present.
func (fw *firewall) exists(c *nftables.Conn) (bool, error) {
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("nftables: listing tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == fw.table.Name {
			return true, nil
		}
	}
	return false, nil
}

// remove deletes our table and everything in it.
func (fw *firewall) remove(c *nftables.Conn) error {
	ok, err := fw.exists(c)
	if err != nil || !ok {
		return err
	}
	c.DelTable(fw.table)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: deleting table %s: %w", fw.table.Name, err)
	}
	return nil
}

// install creates the table with its base chains, unless it exists
// (another live supervisor made it: its base rules are the same).
func (fw *firewall) install(c *nftables.Conn) error {
	ok, err := fw.exists(c)
	if err != nil || ok {
		return err
	}
	policy := nftables.ChainPolicyAccept
	c.CreateTable(fw.table)
	forward := c.AddChain(&nftables.Chain{
		Name: "forward", Table: fw.table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &policy,
	})
	input := c.AddChain(&nftables.Chain{
		Name: "input", Table: fw.table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &policy,
	})
	post := c.AddChain(&nftables.Chain{
		Name: "postrouting", Table: fw.table, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &policy,
	})
	ours := ifnamePrefix(fw.linkPrefix)
	rule := func(ch *nftables.Chain, exprs ...expr.Any) {
		c.AddRule(&nftables.Rule{Table: fw.table, Chain: ch, Exprs: exprs})
	}
	rule(forward, cat(iifname(ours), drop())...)
	rule(forward, cat(oifname(ours), ctEstablished(), accept())...)
	rule(forward, cat(oifname(ours), drop())...)
	rule(input, cat(iifname(ours), drop())...)
	rule(post, cat(iifname(ours), []expr.Any{&expr.Masq{}})...)
	if err := c.Flush(); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return nil // made by another supervisor at the same moment
		}
		return fmt.Errorf("nftables: creating table %s: %w", fw.table.Name, err)
	}
	return nil
}

// egressPolicy is what one execution may reach.
type egressPolicy struct {
	link     string
	source   netip.Addr
	pool     netip.Prefix
	allow    []netip.Prefix
	outbound string // NETWORK_INTERFACE
}

// addExecution gives one link its chain and the jump to it, in one batch.
func (fw *firewall) addExecution(c *nftables.Conn, p egressPolicy) error {
	ch := c.AddChain(fw.chain(p.link))
	rule := func(exprs ...expr.Any) {
		c.AddRule(&nftables.Rule{Table: fw.table, Chain: ch, Exprs: exprs})
	}
	rule(cat(ctEstablished(), accept())...)
	rule(cat(nfproto(unix.NFPROTO_IPV4), saddrNot(p.source), drop())...)
	rule(cat(nfproto(unix.NFPROTO_IPV6), drop())...) // no IPv6 yet: nothing leaves
	rule(cat(daddrIn(p.pool), drop())...)
	for _, r := range blockedRanges {
		rule(cat(daddrIn(r), drop())...)
	}
	for _, r := range p.allow {
		rule(cat(daddrIn(r), accept())...)
	}
	for _, r := range PrivateRanges {
		rule(cat(daddrIn(r), drop())...)
	}
	if p.outbound != "" {
		rule(cat(oifname(ifnameExact(p.outbound)), accept())...)
	}
	rule(drop()...)
	c.InsertRule(&nftables.Rule{
		Table: fw.table, Chain: fw.chain("forward"),
		Exprs:    cat(iifname(ifnameExact(p.link)), []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: p.link}}),
		UserData: []byte(p.link),
	})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: rules of %s: %w", p.link, err)
	}
	return nil
}

// removeExecution deletes the jump and the chain of one link; missing
// pieces are not an error.
func (fw *firewall) removeExecution(c *nftables.Conn, link string) error {
	rules, err := c.GetRules(fw.table, fw.chain("forward"))
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("nftables: listing forward rules: %w", err)
	}
	for _, r := range rules {
		if string(r.UserData) == link {
			if err := c.DelRule(r); err != nil {
				return fmt.Errorf("nftables: %w", err)
			}
		}
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("nftables: listing chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name == fw.table.Name && ch.Name == link {
			c.FlushChain(ch)
			c.DelChain(ch)
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: removing rules of %s: %w", link, err)
	}
	return nil
}

// ourChains lists the per-execution chains present in the table.
func (fw *firewall) ourChains(c *nftables.Conn) ([]string, error) {
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("nftables: listing chains: %w", err)
	}
	var out []string
	for _, ch := range chains {
		if ch.Table.Name == fw.table.Name && strings.HasPrefix(ch.Name, fw.linkPrefix) {
			out = append(out, ch.Name)
		}
	}
	return out, nil
}

// Expression helpers: each returns the expressions of one match or
// verdict, loading into register 1.

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// ifnameExact is an interface name as nftables compares it: padded to
// IFNAMSIZ with zeros. ifnamePrefix leaves the padding out, which makes
// the comparison a prefix match (nft's "name*").
func ifnameExact(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func ifnamePrefix(prefix string) []byte { return []byte(prefix) }

func iifname(name []byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name},
	}
}

func oifname(name []byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name},
	}
}

func nfproto(proto byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
	}
}

func ctEstablished() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{
			SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
			Xor:  binaryutil.NativeEndian.PutUint32(0),
		},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
	}
}

// ipv4Field loads the IPv4 source (offset 12) or destination (16) address,
// after checking that the packet is IPv4 (the table is inet).
func ipv4Field(offset uint32) []expr.Any {
	return cat(nfproto(unix.NFPROTO_IPV4), []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
	})
}

func daddrIn(p netip.Prefix) []expr.Any {
	return cat(ipv4Field(16), []expr.Any{
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: net.CIDRMask(p.Bits(), 32), Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Masked().Addr().AsSlice()},
	})
}

func saddrNot(a netip.Addr) []expr.Any {
	return cat(ipv4Field(12), []expr.Any{
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: a.AsSlice()},
	})
}

func accept() []expr.Any { return []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}} }
func drop() []expr.Any   { return []expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}} }
