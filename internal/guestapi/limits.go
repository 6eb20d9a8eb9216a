package guestapi

import (
	"fmt"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// ConnLimits bound the guest API connections of one execution; the guest
// channel's server reads them from the handler (ConnectionLimits).
type ConnLimits struct {
	// Max is how many connections may be open at once; beyond it an idle
	// one is closed to make room, or the new one when none is idle.
	Max int
	// ReadHeaderTimeout bounds the wait for a request's headers, and
	// IdleTimeout the wait for the next request on a kept-alive connection.
	ReadHeaderTimeout time.Duration
	IdleTimeout       time.Duration
}

// DefaultConnLimits are used for the zero fields of Options.Connections.
var DefaultConnLimits = ConnLimits{Max: 64, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 60 * time.Second}

func (l ConnLimits) withDefaults() ConnLimits {
	if l.Max <= 0 {
		l.Max = DefaultConnLimits.Max
	}
	if l.ReadHeaderTimeout <= 0 {
		l.ReadHeaderTimeout = DefaultConnLimits.ReadHeaderTimeout
	}
	if l.IdleTimeout <= 0 {
		l.IdleTimeout = DefaultConnLimits.IdleTimeout
	}
	return l
}

// ConnectionLimits tells the server of the guest channel how many
// connections to keep and for how long (see guest.Client.ServeGuestAPI).
func (g *guestAPI) ConnectionLimits() (maxConns int, readHeaderTimeout, idleTimeout time.Duration) {
	l := g.o.Connections.withDefaults()
	return l.Max, l.ReadHeaderTimeout, l.IdleTimeout
}

// Publications rate-limits what the node signs for programs (/sign and
// pubsub publications): each program has its own budget and all of them
// share the node's, so that no program can get the node's address limited
// by the network. One value is shared by every execution's handler.
type Publications struct {
	perProgram rate.Limit
	burst      int
	node       *rate.Limiter

	mu       sync.Mutex
	programs map[string]*rate.Limiter
}

// maxTrackedPrograms bounds the per-program limiters kept; beyond it the
// ones with a full budget (which a new limiter would equal) are dropped.
const maxTrackedPrograms = 4096

// NewPublications allows perProgram publications a minute to each program
// and node a minute to all of them, each in bursts of as many.
func NewPublications(perProgram, node int) *Publications {
	perProgram, node = max(perProgram, 1), max(node, 1)
	return &Publications{
		perProgram: rate.Limit(float64(perProgram) / 60),
		burst:      perProgram,
		node:       rate.NewLimiter(rate.Limit(float64(node)/60), node),
		programs:   map[string]*rate.Limiter{},
	}
}

// take spends one publication of program's budget and the node's, or
// spends nothing and returns a RateLimited error telling when to retry.
func (p *Publications) take(program string) (retryAfter time.Duration, err error) {
	if p == nil {
		return 0, nil
	}
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	l, ok := p.programs[program]
	if !ok {
		if len(p.programs) >= maxTrackedPrograms {
			for k, v := range p.programs {
				if v.TokensAt(now) >= float64(p.burst) {
					delete(p.programs, k)
				}
			}
		}
		l = rate.NewLimiter(p.perProgram, p.burst)
		p.programs[program] = l
	}
	mine := l.ReserveN(now, 1)
	if d := mine.DelayFrom(now); d > 0 {
		mine.CancelAt(now)
		return d, errkind.New(errkind.RateLimited, "this program made its %d node-signed publications of the last minute; retry later", p.burst)
	}
	all := p.node.ReserveN(now, 1)
	if d := all.DelayFrom(now); d > 0 {
		all.CancelAt(now)
		mine.CancelAt(now)
		return d, errkind.New(errkind.RateLimited, "this node made its %d node-signed publications of the last minute; retry later", p.node.Burst())
	}
	return 0, nil
}

// refuse answers a refusal in aleph-vm's words ("<status>: <reason>"),
// its status from the error's kind, with Retry-After for rate limits.
func (g *guestAPI) refuse(w http.ResponseWriter, r *http.Request, err error, retryAfter time.Duration) {
	code := errkind.HTTPStatus(err)
	if retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(retryAfter.Seconds()))))
	}
	g.log.Debug("guest API refused", "program", g.o.Program.Hash, "path", r.URL.Path, "status", code, "err", err)
	writeText(w, code, fmt.Sprintf("%d: %s", code, err))
}

// sameHostRedirects follows a redirect only within the Aleph API's scheme
// and host: the relay must never hand a program what another service
// answers, such as one that listens on the node's loopback only. Other
// redirects are relayed as they are (their status and body).
func sameHostRedirects(apiServer string) func(*http.Request, []*http.Request) error {
	api, err := url.Parse(apiServer)
	return func(req *http.Request, via []*http.Request) error {
		if err != nil || req.URL.Scheme != api.Scheme || req.URL.Host != api.Host {
			return http.ErrUseLastResponse
		}
		if len(via) >= 10 {
			return http.ErrUseLastResponse
		}
		return nil
	}
}
