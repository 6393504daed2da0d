package main

import (
	"fmt"
	"math"
	"os"
	"strings"
	"time"
)

type point struct{ x, y float64 }

var (
	colors = []string{"#1b7837", "#c51b7d", "#2166ac", "#e08214"}
	dashes = []string{"none", "8 4", "2 3", "12 3 2 3"} // overlapping series stay visible
)

// writeLineChart draws series on log-log axes (fleet sizes and call counts
// span decades).
func writeLineChart(path, title, xlabel, ylabel string, names []string, series [][]point) error {
	const W, H, L, R, T, B = 640.0, 400.0, 70.0, 20.0, 40.0, 60.0
	minX, maxX, minY, maxY := math.Inf(1), math.Inf(-1), 1.0, math.Inf(-1)
	for _, s := range series {
		for _, p := range s {
			minX, maxX = math.Min(minX, p.x), math.Max(maxX, p.x)
			maxY = math.Max(maxY, p.y)
		}
	}
	lx := func(x float64) float64 {
		return L + (math.Log10(x)-math.Log10(minX))/(math.Log10(maxX)-math.Log10(minX))*(W-L-R)
	}
	top := math.Pow(10, math.Ceil(math.Log10(maxY*1.01)))
	ly := func(y float64) float64 {
		return H - B - (math.Log10(math.Max(y, minY))-math.Log10(minY))/(math.Log10(top)-math.Log10(minY))*(H-T-B)
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" font-family="sans-serif" font-size="12">`, W, H)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/><text x="%.0f" y="22" font-size="15">%s</text>`, L, title)
	for d := minY; d <= top; d *= 10 {
		fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#ddd"/><text x="%.1f" y="%.1f" text-anchor="end">%g</text>`, L, W-R, ly(d), ly(d), L-6, ly(d)+4, d)
	}
	for _, p := range series[0] {
		fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#ddd"/><text x="%.1f" y="%.1f" text-anchor="middle">%g</text>`, lx(p.x), lx(p.x), T, H-B, lx(p.x), H-B+16, p.x)
	}
	fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`, (L+W-R)/2, H-18, xlabel)
	fmt.Fprintf(&b, `<text transform="translate(16 %.1f) rotate(-90)" text-anchor="middle">%s</text>`, (T+H-B)/2, ylabel)
	for i, s := range series {
		var pts []string
		for _, p := range s {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", lx(p.x), ly(p.y)))
			fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>`, lx(p.x), ly(p.y), colors[i])
		}
		fmt.Fprintf(&b, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2" stroke-dasharray="%s"/>`, strings.Join(pts, " "), colors[i], dashes[i%len(dashes)])
		fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="12" height="3" fill="%s"/><text x="%.1f" y="%.1f">%s</text>`, L+10, T+10+float64(i)*16, colors[i], L+28, T+15+float64(i)*16, names[i])
	}
	b.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// writeCDF draws cumulative distributions of latencies (ms, linear axis).
func writeCDF(path, title string, names []string, samples [][]time.Duration) error {
	const W, H, L, R, T, B = 640.0, 400.0, 60.0, 20.0, 40.0, 60.0
	maxMS := 0.0
	for _, s := range samples {
		maxMS = math.Max(maxMS, float64(s[int(0.995*float64(len(s)-1))])/1e6)
	}
	maxMS = math.Max(1, math.Ceil(maxMS))
	lx := func(ms float64) float64 { return L + math.Min(ms, maxMS)/maxMS*(W-L-R) }
	ly := func(f float64) float64 { return H - B - f*(H-T-B) }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" font-family="sans-serif" font-size="12">`, W, H)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/><text x="%.0f" y="22" font-size="15">%s</text>`, L, title)
	for f := 0.0; f <= 1.0001; f += 0.25 {
		fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#ddd"/><text x="%.1f" y="%.1f" text-anchor="end">%.0f%%</text>`, L, W-R, ly(f), ly(f), L-6, ly(f)+4, f*100)
	}
	for i := 0.0; i <= 4; i++ {
		ms := maxMS * i / 4
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%.1f</text>`, lx(ms), H-B+16, ms)
	}
	fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">milliseconds from the rotating write to serving the new version (axis cut at p99.5)</text>`, (L+W-R)/2, H-18)
	for i, s := range samples {
		var pts []string
		step := max(1, len(s)/400)
		for j := 0; j < len(s); j += step {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", lx(float64(s[j])/1e6), ly(float64(j+1)/float64(len(s)))))
		}
		pts = append(pts, fmt.Sprintf("%.1f,%.1f", lx(float64(s[len(s)-1])/1e6), ly(1)))
		fmt.Fprintf(&b, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2" stroke-dasharray="%s"/>`, strings.Join(pts, " "), colors[i], dashes[i%len(dashes)])
		fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="12" height="3" fill="%s"/><text x="%.1f" y="%.1f">%s</text>`, W-R-220, H-B-60+float64(i)*16, colors[i], W-R-202, H-B-55+float64(i)*16, names[i])
	}
	b.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(b.String()), 0o644)
}
