package main

import (
	"fmt"
	"html"
	"io"
	"math"
	"sort"
)

// series is one set of samples drawn in the chart.
type series struct {
	name    string
	samples []float64
	color   string
}

var palette = []string{"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"}

// writeChart draws two panels as plain SVG: every cold start of each
// series as a dot on one line (a tick at the median), and the warm
// latencies' cumulative distributions.
func writeChart(w io.Writer, r result) error {
	var cold []series
	add := func(name string, s []float64) {
		if len(s) > 0 {
			cold = append(cold, series{name: name, samples: s})
		}
	}
	add("native uvicorn", r.Native.ColdStartMs)
	add("floor: uvicorn in runsc", r.Floor.ColdStartMs)
	add("supervisor, spare", r.Supervisor.ColdStartMs)
	add("no spare, snapshot", r.NoSpare.ColdStartMs)
	add("no spare, no snapshot", r.NoSnapshot.ColdStartMs)
	add("internet, spare", r.Internet.ColdStartMs)
	add("internet, no spare, snapshot", r.InternetNoSpare.ColdStartMs)
	add("first burst of programs", r.Spares.FirstBurstMs)
	add("back-to-back programs", r.Spares.BackToBackMs)
	if r.Spares.AfterIdleMs > 0 {
		add(fmt.Sprintf("spare after %.0f s idle", r.Spares.IdleSeconds), []float64{r.Spares.AfterIdleMs})
	}
	var warm []series
	for _, s := range []series{{"native", r.Native.WarmMs, ""}, {"floor", r.Floor.WarmMs, ""}, {"supervisor", r.Supervisor.WarmMs, ""}} {
		if len(s.samples) > 0 {
			warm = append(warm, s)
		}
	}
	for i := range cold {
		cold[i].color = palette[i%len(palette)]
	}
	for i := range warm {
		warm[i].color = palette[i%len(palette)]
	}

	const width, left, right, rowH = 900, 220, 30, 26
	coldH := 60 + rowH*len(cold) + 40
	warmH := 320
	p := &svg{w: w}
	p.f(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`, width, coldH+warmH)
	p.f(`<rect width="100%%" height="100%%" fill="white"/>`)

	// Cold starts: a linear axis from 0 to the slowest.
	maxCold := 0.0
	for _, s := range cold {
		for _, v := range s.samples {
			maxCold = max(maxCold, v)
		}
	}
	maxCold = niceCeil(maxCold)
	x := func(v float64) float64 { return left + v/maxCold*(width-left-right) }
	p.f(`<text x="10" y="22" font-size="15" font-weight="bold">Cold starts (ms, every sample; bar: median)</text>`)
	top := 45
	for i, s := range cold {
		y := top + rowH*i + rowH/2
		p.f(`<text x="%d" y="%d" text-anchor="end">%s</text>`, left-8, y+4, html.EscapeString(s.name))
		p.f(`<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="#eee"/>`, left, width-right, y, y)
		for _, v := range s.samples {
			p.f(`<circle cx="%.1f" cy="%d" r="4" fill="%s" fill-opacity="0.6"/>`, x(v), y, s.color)
		}
		m := median(s.samples)
		p.f(`<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="black" stroke-width="2"/>`, x(m), x(m), y-9, y+9)
		p.f(`<text x="%.1f" y="%d" font-size="10">%.0f</text>`, x(m)+4, y-6, m)
	}
	axisY := top + rowH*len(cold) + 5
	p.axis(left, width-right, axisY, maxCold, x)

	// Warm latency: cumulative distribution, x linear up to the largest
	// p99 so that one outlier does not squash the curves.
	base := coldH
	p.f(`<text x="10" y="%d" font-size="15" font-weight="bold">Warm latency, concurrency 1 (ms; cumulative share of requests)</text>`, base+22)
	maxWarm := 0.0
	for _, s := range warm {
		sorted := append([]float64(nil), s.samples...)
		sort.Float64s(sorted)
		maxWarm = max(maxWarm, sorted[len(sorted)*99/100])
	}
	maxWarm = niceCeil(maxWarm)
	xw := func(v float64) float64 { return left + min(v, maxWarm)/maxWarm*(width-left-right) }
	plotTop, plotBottom := base+40, base+warmH-40
	yw := func(q float64) float64 { return float64(plotBottom) - q*float64(plotBottom-plotTop) }
	for _, q := range []float64{0, 0.5, 0.9, 1} {
		p.f(`<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#eee"/>`, left, width-right, yw(q), yw(q))
		p.f(`<text x="%d" y="%.1f" text-anchor="end">%.0f%%</text>`, left-8, yw(q)+4, q*100)
	}
	for i, s := range warm {
		sorted := append([]float64(nil), s.samples...)
		sort.Float64s(sorted)
		p.f(`<polyline fill="none" stroke="%s" stroke-width="2" points="`, s.color)
		for j, v := range sorted {
			p.f(`%.1f,%.1f `, xw(v), yw(float64(j+1)/float64(len(sorted))))
		}
		p.f(`"/>`)
		p.f(`<text x="%d" y="%d" fill="%s">%s (p50 %.2f ms)</text>`, left+10, plotTop+16*i+4, s.color,
			html.EscapeString(s.name), sorted[len(sorted)/2])
	}
	p.axis(left, width-right, plotBottom+5, maxWarm, xw)
	p.f(`</svg>`)
	return p.err
}

// svg writes formatted text and keeps the first error.
type svg struct {
	w   io.Writer
	err error
}

func (p *svg) f(format string, args ...any) {
	if p.err == nil {
		_, p.err = fmt.Fprintf(p.w, format+"\n", args...)
	}
}

// axis draws a horizontal axis with five ticks from 0 to top.
func (p *svg) axis(x0, x1, y int, top float64, x func(float64) float64) {
	p.f(`<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="black"/>`, x0, x1, y, y)
	for i := range 6 {
		v := top * float64(i) / 5
		p.f(`<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="black"/>`, x(v), x(v), y, y+4)
		p.f(`<text x="%.1f" y="%d" text-anchor="middle" font-size="10">%s</text>`, x(v), y+16, trimFloat(v))
	}
}

// niceCeil rounds up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if v <= m*p {
			return m * p
		}
	}
	return 10 * p
}

func trimFloat(v float64) string {
	if v == math.Trunc(v) {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.2g", v)
}
