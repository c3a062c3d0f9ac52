package handlers

import (
	"errors"
	"strings"
	"testing"
)

// pngBytes is a complete 1×1 PNG.
var pngBytes = []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89" +
	"\x00\x00\x00\rIDATx\x9cc\x00\x01\x00\x00\x05\x00\x01\r\n-\xb4\x00\x00\x00\x00IEND\xaeB`\x82")

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
			name:     "an .md name does not make CSV Markdown",
			filename: "table.md",
			data:     "a,b\n1,2\n",
			want:     Extraction{ContentType: "text/csv", Text: "a b\n1 2", Words: 4, Lines: 2},
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
