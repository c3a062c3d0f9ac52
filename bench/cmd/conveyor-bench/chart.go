package main

import (
	"fmt"
	"html"
	"math"
	"strings"
)

// Chart geometry, in SVG user units.
const (
	chartWidth  = 1100
	labelWidth  = 470
	barArea     = 500
	barHeight   = 16
	barGap      = 6
	panelHeader = 46
)

var roleColour = map[string]string{
	roleConveyor: "#2f6fdf",
	roleBaseline: "#9a9a9a",
	rolePeer:     "#e08a2c",
}

// chart draws the throughput and latency results as two horizontal bar
// charts on logarithmic axes.
func (b *bench) chart() string {
	var panels []string
	var heights []int
	for _, p := range []struct{ kind, title string }{
		{"throughput", "Throughput (log scale; higher is better)"},
		{"latency", "Latency in ms at 1,000 events/s (log scale; lower is better)"},
	} {
		var ls []line
		for _, l := range b.lines {
			if l.chart == p.kind && l.err == nil && l.value > 0 {
				ls = append(ls, l)
			}
		}
		if len(ls) == 0 {
			continue
		}
		svg, h := panel(p.title, ls)
		panels = append(panels, svg)
		heights = append(heights, h)
	}
	total := 60
	for _, h := range heights {
		total += h + 20
	}
	var s strings.Builder
	fmt.Fprintf(&s, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n",
		chartWidth, total, chartWidth, total)
	fmt.Fprintf(&s, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&s, `<text x="10" y="22" font-size="16" font-weight="bold">Conveyor benchmark %s</text>`+"\n", html.EscapeString(b.stamp))
	x := 10
	for _, role := range []string{roleConveyor, roleBaseline, rolePeer} {
		fmt.Fprintf(&s, `<rect x="%d" y="32" width="12" height="12" fill="%s"/><text x="%d" y="42">%s</text>`+"\n", x, roleColour[role], x+16, role)
		x += 110
	}
	y := 60
	for i, p := range panels {
		fmt.Fprintf(&s, `<g transform="translate(0,%d)">%s</g>`+"\n", y, p)
		y += heights[i] + 20
	}
	s.WriteString("</svg>\n")
	return s.String()
}

// panel draws one bar chart and returns it with its height.
func panel(title string, ls []line) (string, int) {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, l := range ls {
		lo = math.Min(lo, l.value)
		hi = math.Max(hi, l.value)
	}
	minExp := math.Floor(math.Log10(lo))
	maxExp := math.Ceil(math.Log10(hi))
	if maxExp == minExp {
		maxExp++
	}
	scale := func(v float64) float64 {
		return (math.Log10(v) - minExp) / (maxExp - minExp) * barArea
	}
	h := panelHeader + len(ls)*(barHeight+barGap) + 20
	var s strings.Builder
	fmt.Fprintf(&s, `<text x="10" y="16" font-size="14" font-weight="bold">%s</text>`, html.EscapeString(title))
	top := panelHeader - 10
	for e := minExp; e <= maxExp; e++ {
		x := float64(labelWidth) + scale(math.Pow(10, e))
		fmt.Fprintf(&s, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>`, x, top, x, h-16)
		fmt.Fprintf(&s, `<text x="%.1f" y="%d" text-anchor="middle" fill="#666">%s</text>`, x, top-4, formatNum(math.Pow(10, e)))
	}
	for i, l := range ls {
		y := panelHeader + i*(barHeight+barGap)
		w := math.Max(1, scale(l.value))
		label, _, _ := strings.Cut(l.what, " vs ")
		fmt.Fprintf(&s, `<text x="%d" y="%d" text-anchor="end">%s</text>`, labelWidth-8, y+12, html.EscapeString(label))
		fmt.Fprintf(&s, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`, labelWidth, y, w, barHeight, roleColour[l.role])
		fmt.Fprintf(&s, `<text x="%.1f" y="%d">%s</text>`, float64(labelWidth)+w+4, y+12, html.EscapeString(formatValue(l.value, l.unit)))
	}
	return s.String(), h
}
