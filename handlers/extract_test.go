package handlers

import (
	"bytes"
	"errors"
	"runtime"
	"strings"
	"testing"
)

// pngBytes is a complete 1×1 PNG.
var pngBytes = []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89" +
	"\x00\x00\x00\rIDATx\x9cc\x00\x01\x00\x00\x05\x00\x01\r\n-\xb4\x00\x00\x00\x00IEND\xaeB`\x82")

// letter is text with commas and a stray quote, which sniffing takes for CSV.
const letter = "Dear all, thanks, see you.\nMore, words, here.\nA \"quoted, thing, ok.\n"

const srt = "1\n00:00:01,000 --> 00:00:02,000\nHello there.\n\n2\n00:00:03,000 --> 00:00:04,000\nBye.\n"

const mail = "From: a@example.com\nTo: b@example.com\nSubject: Hi\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n\nHello there.\n"

func TestExtract(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		filename string
		data     string
		// want is the extraction when wantErr is empty.
		want Extraction
		// wantErr is part of the reason of an unprocessable document.
		wantErr string
		// wantType is the content type reported with the error.
		wantType string
	}{
		{
			name:     "plain text",
			filename: "notes.txt",
			data:     "Hello world.\nSecond line here.\n",
			want:     Extraction{ContentType: "text/plain", Text: "Hello world.\nSecond line here.", Words: 5, Lines: 2},
		},
		{
			name:     "CRLF line ends",
			filename: "dos.txt",
			data:     "one two\r\nthree\r\n",
			want:     Extraction{ContentType: "text/plain", Text: "one two\nthree", Words: 3, Lines: 2},
		},
		{
			name:     "multibyte text",
			filename: "gruss.txt",
			data:     "Grüße aus Köln.\n日本語 のテキスト。\n",
			want:     Extraction{ContentType: "text/plain", Text: "Grüße aus Köln.\n日本語 のテキスト。", Words: 5, Lines: 2},
		},
		{
			name:     "markdown by its .md name",
			filename: "README.md",
			data:     "# Title\n\nSome *text* here.\n",
			want:     Extraction{ContentType: "text/markdown", Text: "# Title\n\nSome *text* here.", Words: 5, Lines: 3},
		},
		{
			name:     "markdown by an upper-case .MARKDOWN name",
			filename: "NOTES.MARKDOWN",
			data:     "just words",
			want:     Extraction{ContentType: "text/markdown", Text: "just words", Words: 2, Lines: 1},
		},
		{
			name:     "the same bytes without the .md name are plain text",
			filename: "README",
			data:     "# Title\n\nSome *text* here.\n",
			want:     Extraction{ContentType: "text/plain", Text: "# Title\n\nSome *text* here.", Words: 5, Lines: 3},
		},
		{
			name:     "CSV records become lines of words",
			filename: "people.csv",
			data:     "name,age\nalice,30\nbob,41\n",
			want:     Extraction{ContentType: "text/csv", Text: "name age\nalice 30\nbob 41", Words: 6, Lines: 3},
		},
		{
			name:     "CSV quoted fields keep their commas and each record stays on one line",
			filename: "quotes.csv",
			data:     "name,quote\nalice,\"hello, world\"\nbob,\"two\nlines\"\n",
			want:     Extraction{ContentType: "text/csv", Text: "name quote\nalice hello, world\nbob two lines", Words: 8, Lines: 3},
		},
		{
			name:     "JSON string values only, in document order",
			filename: "doc.json",
			data: `{"title":"Hello there","count":3,"ok":true,"none":null,` +
				`"tags":["a","b"],"nested":{"key":"v","deeper":[{"deep":"x"},[],["y"]]},"empty":{},"last":"z"}`,
			want: Extraction{ContentType: "application/json", Text: "Hello there\na\nb\nv\nx\ny\nz", Words: 8, Lines: 7},
		},
		{
			name:     "JSON top-level array",
			filename: "list.json",
			data:     `["first item", {"k": "second"}]`,
			want:     Extraction{ContentType: "application/json", Text: "first item\nsecond", Words: 3, Lines: 2},
		},
		{
			name:     "JSON without string values has no text",
			filename: "numbers.json",
			data:     `{"key": 1, "other": [true, 2.5]}`,
			want:     Extraction{ContentType: "application/json"},
		},
		{
			// Sniffing finds no JSON, so the bytes are what they look
			// like byte by byte: plain text, and they are processed as such.
			name:     "JSON-looking text that is not JSON is plain text",
			filename: "broken.json",
			data:     `{"title": "Hello", "oops": }`,
			want:     Extraction{ContentType: "text/plain", Text: `{"title": "Hello", "oops": }`, Words: 4, Lines: 1},
		},
		{
			name:     "HTML without tags, scripts and styles; block elements make lines",
			filename: "page.html",
			data: "<!DOCTYPE html><html><head><title>T</title><style>p{color:red}</style>" +
				"<script>var x = 1;</script></head><body><h1>Head</h1><p>One\n   two</p><div>three</div>" +
				"<ul><li>four</li><li>five</li></ul><script>alert('no')</script><noscript>hidden</noscript>" +
				"<p>Fish &amp; chips<br>next</p></body></html>",
			want: Extraction{ContentType: "text/html", Text: "T\nHead\nOne two\nthree\nfour\nfive\nFish & chips\nnext", Words: 11, Lines: 8},
		},
		{
			name:     "HTML inline elements do not split words",
			filename: "inline.html",
			data:     "<html><body><p>Hello <b>world</b>!</p><p>un<i>believ</i>able <a href=\"/x\">link</a>s</p></body></html>",
			want:     Extraction{ContentType: "text/html", Text: "Hello world!\nunbelievable links", Words: 4, Lines: 2},
		},
		{
			name:     "HTML table cells stay separate words",
			filename: "table.html",
			data:     "<html><body><table><tr><td>a</td><td>b</td></tr><tr><th>c</th><th>d</th></tr></table></body></html>",
			want:     Extraction{ContentType: "text/html", Text: "a b\nc d", Words: 4, Lines: 2},
		},
		{
			name:     "HTML sniffed from the bytes, not the name",
			filename: "page.txt",
			data:     "<html><body><p>Hi there</p></body></html>",
			want:     Extraction{ContentType: "text/html", Text: "Hi there", Words: 2, Lines: 1},
		},
		{
			name:     "a .json name does not make text JSON",
			filename: "notes.json",
			data:     "just some words",
			want:     Extraction{ContentType: "text/plain", Text: "just some words", Words: 3, Lines: 1},
		},
		{
			// Sniffing CSV is a guess from commas, weaker than the name
			// a user gave: a Markdown table row or a sentence has them too.
			name:     "an .md name is not overridden by a CSV guess",
			filename: "table.md",
			data:     "a,b\n1,2\n",
			want:     Extraction{ContentType: "text/markdown", Text: "a,b\n1,2", Words: 2, Lines: 2},
		},
		{
			name:     "a .txt name is not overridden by a CSV guess",
			filename: "notes.txt",
			data:     "name,age\nalice,30\n",
			want:     Extraction{ContentType: "text/plain", Text: "name,age\nalice,30", Words: 2, Lines: 2},
		},
		{
			name:     "a .txt letter with commas and a stray quote is text",
			filename: "letter.txt",
			data:     letter,
			want:     Extraction{ContentType: "text/plain", Text: strings.TrimSpace(letter), Words: 12, Lines: 3},
		},
		{
			// Sniffed as CSV, but encoding/csv refuses the bare quote: valid
			// UTF-8 without a .csv name is processed as the text it is.
			name:     "text sniffed as CSV that does not parse is plain text",
			filename: "letter",
			data:     letter,
			want:     Extraction{ContentType: "text/plain", Text: strings.TrimSpace(letter), Words: 12, Lines: 3},
		},
		{
			name:     "XHTML is extracted as HTML",
			filename: "page.xhtml",
			data: `<?xml version="1.0" encoding="UTF-8"?>` + "\n" + `<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" ` +
				`"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd"><html xmlns="http://www.w3.org/1999/xhtml">` +
				`<head><title>T</title></head><body><p>Hello <b>there</b></p></body></html>`,
			want: Extraction{ContentType: "application/xhtml+xml", Text: "T\nHello there", Words: 3, Lines: 2},
		},
		{
			name:     "GeoJSON is extracted as JSON",
			filename: "parks.geojson",
			data: `{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"name":"Park"},` +
				`"geometry":{"type":"Point","coordinates":[1,2]}}]}`,
			want: Extraction{ContentType: "application/geo+json", Text: "FeatureCollection\nFeature\nPark\nPoint", Words: 4, Lines: 4},
		},
		{
			name:     "NDJSON is extracted as a stream of JSON values",
			filename: "log.ndjson",
			data:     "{\"msg\":\"one\"}\n{\"msg\":\"two words\"}\n",
			want:     Extraction{ContentType: "application/x-ndjson", Text: "one\ntwo words", Words: 3, Lines: 2},
		},
		{
			name:     "SRT subtitles are text",
			filename: "film.srt",
			data:     srt,
			want:     Extraction{ContentType: "application/x-subrip", Text: strings.TrimSpace(srt), Words: 11, Lines: 7},
		},
		{
			name:     "WebVTT subtitles are text",
			filename: "film.vtt",
			data:     "WEBVTT\n\n00:01.000 --> 00:04.000\nHello there.\n",
			want:     Extraction{ContentType: "text/vtt", Text: "WEBVTT\n\n00:01.000 --> 00:04.000\nHello there.", Words: 6, Lines: 4},
		},
		{
			name:     "tab-separated values are text",
			filename: "people.tsv",
			data:     "name\tage\nalice\t30\nbob\t41\n",
			want:     Extraction{ContentType: "text/tab-separated-values", Text: "name\tage\nalice\t30\nbob\t41", Words: 6, Lines: 3},
		},
		{
			name:     "a mail saved as text is text",
			filename: "mail.txt",
			data:     mail,
			want:     Extraction{ContentType: "message/rfc822", Text: strings.TrimSpace(mail), Words: 15, Lines: 6},
		},
		{
			name:     "JSON escapes of control characters become spaces",
			filename: "nul.json",
			data:     `{"a":"x\u0000y","b":"tab\u0009kept\u001bz"}`,
			want:     Extraction{ContentType: "application/json", Text: "x y\ntab\tkept z", Words: 5, Lines: 2},
		},
		{
			name:     "control characters in text become spaces",
			filename: "esc.txt",
			data:     "hello\x1bworld\r\nbye",
			want:     Extraction{ContentType: "text/plain", Text: "hello world\nbye", Words: 3, Lines: 2},
		},
		{
			name:     "whitespace only",
			filename: "blank.txt",
			data:     " \n\t\n",
			want:     Extraction{ContentType: "text/plain"},
		},
		{
			name:     "empty file",
			filename: "empty.txt",
			data:     "",
			wantErr:  "the document is empty",
		},
		{
			name:     "PNG image, even named .txt",
			filename: "photo.txt",
			data:     string(pngBytes),
			wantErr:  "unsupported content type image/png",
			wantType: "image/png",
		},
		{
			name:     "PNG image named .csv",
			filename: "photo.csv",
			data:     string(pngBytes),
			wantErr:  "unsupported content type image/png",
			wantType: "image/png",
		},
		{
			// Under text/plain in mimetype's tree, but an image.
			name:     "SVG image",
			filename: "logo.txt",
			data:     `<svg xmlns="http://www.w3.org/2000/svg"><text>Hi</text></svg>`,
			wantErr:  "unsupported content type image/svg+xml",
			wantType: "image/svg+xml",
		},
		{
			name:     "ZIP archive",
			filename: "archive.txt",
			data:     "PK\x03\x04\x14\x00\x00\x00\x00\x00",
			wantErr:  "unsupported content type application/zip",
			wantType: "application/zip",
		},
		{
			name:     "PDF",
			filename: "paper.pdf",
			data:     "%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
			wantErr:  "unsupported content type application/pdf",
			wantType: "application/pdf",
		},
		{
			name:     "invalid UTF-8 text",
			filename: "latin1.txt",
			data:     "caf\xe9 cr\xe8me br\xfbl\xe9e and more words",
			wantErr:  "text is not valid UTF-8",
			wantType: "text/plain",
		},
		{
			name:     "corrupt CSV: a bare quote",
			filename: "bad.csv",
			data:     "a,b\nx\"y,z\nc,d\n",
			wantErr:  "corrupt CSV",
			wantType: "text/csv",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := Extract([]byte(tt.data), tt.filename)
			if tt.wantErr != "" {
				var unproc errUnprocessable
				if !errors.As(err, &unproc) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Extract error = %v, want an unprocessable error containing %q", err, tt.wantErr)
				}
				if got.ContentType != tt.wantType {
					t.Errorf("ContentType = %q with the error, want %q", got.ContentType, tt.wantType)
				}
				return
			}
			if err != nil {
				t.Fatalf("Extract: %v", err)
			}
			if got != tt.want {
				t.Errorf("Extract =\n%#v\nwant\n%#v", got, tt.want)
			}
		})
	}
}

// TestExtractHasNoControlCharacters: whatever a document holds, its text
// and its extractive summary hold no C0 control character but tab, LF and
// CR. A NUL would make document.processed fail validation on every retry,
// since PostgreSQL text cannot hold one. Sniffing reads only the first
// bytes, so the control characters come after a clean prefix.
func TestExtractHasNoControlCharacters(t *testing.T) {
	t.Parallel()
	prefix := strings.Repeat("word ", 1000) // past what sniffing reads
	var controls strings.Builder
	for c := range byte(0x20) {
		controls.WriteString(" a")
		controls.WriteByte(c)
		controls.WriteString("b.")
	}
	tests := []struct {
		name     string
		filename string
		data     string
		wantType string
	}{
		{name: "text", filename: "a.txt", data: prefix + controls.String(), wantType: "text/plain"},
		{name: "Markdown", filename: "a.md", data: prefix + controls.String(), wantType: "text/markdown"},
		{name: "CSV", filename: "a.csv", data: strings.Repeat("a,b\n", 1100) + "x" + controls.String() + ",y\n", wantType: "text/csv"},
		{name: "HTML", filename: "a.html", data: "<html><body><p>" + prefix + "</p><p>" + controls.String() + "</p></body></html>", wantType: "text/html"},
		{name: "JSON escapes", filename: "a.json", data: `{"a":"x\u0000y\u0001z\u001f.","b":"\u0000"}`, wantType: "application/json"},
		{name: "NDJSON escapes", filename: "a.ndjson", data: "{\"a\":\"x\\u0000y\"}\n{\"a\":\"\\u0007z\"}\n", wantType: "application/x-ndjson"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := Extract([]byte(tt.data), tt.filename)
			if err != nil {
				t.Fatalf("Extract: %v", err)
			}
			if got.ContentType != tt.wantType {
				t.Errorf("ContentType = %q, want %q", got.ContentType, tt.wantType)
			}
			if i := strings.IndexFunc(got.Text, isBadControl); i >= 0 {
				t.Errorf("text holds %q at byte %d", got.Text[i], i)
			}
			summary, err := Extractive{MaxChars: 100_000}.Summarize(t.Context(), got.Text)
			if err != nil {
				t.Fatalf("Summarize: %v", err)
			}
			if i := strings.IndexFunc(summary, isBadControl); i >= 0 {
				t.Errorf("summary holds %q at byte %d", summary[i], i)
			}
		})
	}
}

func isBadControl(r rune) bool { return r < 0x20 && r != '\t' && r != '\n' && r != '\r' }

// allocated returns the bytes f allocates on the heap. The counter is the
// process's, so a test that uses it must not run in parallel with others.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// TestLargeDocumentAllocations: the processor charges a document its size
// against MaxBytesInFlight, so extracting and summarizing it must allocate
// a small multiple of that size, not a slice header per word (32 MiB of
// "a\n" once took 709 MiB). Not parallel: it reads the process's allocation
// counter.
func TestLargeDocumentAllocations(t *testing.T) {
	const size = 32 << 20 // the processor's default MaxBytes
	tests := []struct {
		name     string
		filename string
		data     []byte
		// most bounds the bytes Extract allocates, in multiples of the
		// document's size: the text is one copy, and CSV and HTML
		// parsers leave garbage behind (more under -race).
		most  float64
		words int
		// slow under -race: skipped with -short.
		slow bool
	}{
		{name: "a line per word", filename: "big.txt", data: bytes.Repeat([]byte("a\n"), size/2), most: 1.1, words: size / 2},
		// The others are smaller: a bound in multiples of the size shows
		// as well, and the race detector makes byte loops slow.
		{name: "CRLF line ends", filename: "big.txt", data: bytes.Repeat([]byte("a\r\n"), size/8/3), most: 1.1, words: size / 8 / 3},
		{name: "CSV", filename: "big.csv", data: bytes.Repeat([]byte("a,b\n"), size/32/4), most: 8, words: size / 32 / 2, slow: true},
		{
			name: "HTML", filename: "big.html", data: append([]byte("<html><body>"), bytes.Repeat([]byte("<p>a</p>"), size/32/8)...),
			most: 8, words: size / 32 / 8, slow: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.slow && testing.Short() {
				t.Skip("slow under -race; skipped with -short")
			}
			var ex Extraction
			var err error
			n := allocated(func() { ex, err = Extract(tt.data, tt.filename) })
			if err != nil {
				t.Fatalf("Extract: %v", err)
			}
			if ex.Words != tt.words {
				t.Errorf("Words = %d, want %d", ex.Words, tt.words)
			}
			t.Logf("Extract of %d bytes of %s allocated %d bytes (%.2f×)", len(tt.data), ex.ContentType, n, float64(n)/float64(len(tt.data)))
			if limit := uint64(tt.most * float64(len(tt.data))); n > limit {
				t.Errorf("Extract of %d bytes allocated %d bytes, want at most %d", len(tt.data), n, limit)
			}

			var summary string
			n = allocated(func() { summary, err = Extractive{}.Summarize(t.Context(), ex.Text) })
			if err != nil || summary == "" {
				t.Fatalf("Summarize = %q, %v", summary, err)
			}
			t.Logf("Summarize allocated %d bytes", n)
			if n > 64<<10 {
				t.Errorf("Summarize of %d bytes of text allocated %d bytes, want at most 64 KiB", len(ex.Text), n)
			}
		})
	}
}
