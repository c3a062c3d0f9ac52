package handlers

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/gabriel-vasile/mimetype"
	"golang.org/x/net/html"
)

// errUnprocessable is a property of the input: retrying cannot help.
type errUnprocessable struct{ reason string }

func (e errUnprocessable) Error() string { return e.reason }

func unprocessable(format string, args ...any) error {
	return errUnprocessable{fmt.Sprintf(format, args...)}
}

// Extraction is what the processor learns from a document's bytes.
type Extraction struct {
	ContentType string
	Text        string
	Words       int
	Lines       int
}

// sniff returns the content type of data from its bytes alone; filename
// only tells Markdown from plain text, which no byte signature can.
func sniff(data []byte, filename string) string {
	m := mimetype.Detect(data)
	ct, _, _ := strings.Cut(m.String(), ";")
	if ct == "text/plain" {
		switch strings.ToLower(filepath.Ext(filename)) {
		case ".md", ".markdown":
			return "text/markdown"
		}
	}
	return ct
}

// Extract sniffs the content type of a document and, for text-like
// documents, extracts its text and counts words and lines. Unsupported or
// corrupt input is an errUnprocessable.
func Extract(data []byte, filename string) (Extraction, error) {
	if len(data) == 0 {
		return Extraction{}, unprocessable("the document is empty")
	}
	ct := sniff(data, filename)
	var text string
	switch ct {
	case "text/plain", "text/markdown":
		if !utf8.Valid(data) {
			return Extraction{ContentType: ct}, unprocessable("text is not valid UTF-8")
		}
		text = string(data)
	case "text/csv":
		t, err := csvText(data)
		if err != nil {
			return Extraction{ContentType: ct}, unprocessable("corrupt CSV: %v", err)
		}
		text = t
	case "application/json":
		t, err := jsonText(data)
		if err != nil {
			return Extraction{ContentType: ct}, unprocessable("corrupt JSON: %v", err)
		}
		text = t
	case "text/html":
		if !utf8.Valid(data) {
			return Extraction{ContentType: ct}, unprocessable("HTML is not valid UTF-8")
		}
		text = htmlText(data)
	default:
		return Extraction{ContentType: ct}, unprocessable("unsupported content type %s: only plain text, Markdown, CSV, JSON and HTML are processed", ct)
	}
	text = strings.TrimSpace(strings.ReplaceAll(text, "\r\n", "\n"))
	return Extraction{ContentType: ct, Text: text, Words: len(strings.Fields(text)), Lines: countLines(text)}, nil
}

func countLines(text string) int {
	if text == "" {
		return 0
	}
	return strings.Count(text, "\n") + 1
}

// csvText puts each record on a line, its fields separated by spaces. A
// quoted field may hold line breaks; they become spaces, so that the line
// count is the record count.
func csvText(data []byte) (string, error) {
	r := csv.NewReader(bytes.NewReader(data))
	r.FieldsPerRecord = -1
	r.LazyQuotes = false
	var b strings.Builder
	for {
		rec, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return "", err
		}
		for i, field := range rec {
			if i > 0 {
				b.WriteByte(' ')
			}
			b.WriteString(strings.Join(strings.Fields(field), " "))
		}
		b.WriteByte('\n')
	}
	return b.String(), nil
}

// jsonText collects the string values (not the keys) of a JSON document,
// one per line, in document order.
func jsonText(data []byte) (string, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	type frame struct{ object, expectKey bool }
	var stack []frame
	var b strings.Builder
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return "", err
		}
		if n := len(stack); n > 0 && stack[n-1].object && stack[n-1].expectKey {
			if d, ok := tok.(json.Delim); ok && d == '}' {
				stack = stack[:n-1]
				continue
			}
			stack[n-1].expectKey = false // tok is a key
			continue
		}
		if n := len(stack); n > 0 && stack[n-1].object {
			stack[n-1].expectKey = true // tok is the value of the last key
		}
		switch v := tok.(type) {
		case json.Delim:
			switch v {
			case '{':
				stack = append(stack, frame{object: true, expectKey: true})
			case '[':
				stack = append(stack, frame{})
			default: // ']' ('}' is handled above)
				stack = stack[:len(stack)-1]
				if n := len(stack); n > 0 && stack[n-1].object {
					stack[n-1].expectKey = true
				}
			}
		case string:
			b.WriteString(v)
			b.WriteByte('\n')
		}
	}
	return b.String(), nil
}

// blockTags end a line of text in HTML.
var blockTags = map[string]bool{
	"p": true, "div": true, "br": true, "li": true, "tr": true, "h1": true, "h2": true, "h3": true,
	"h4": true, "h5": true, "h6": true, "section": true, "article": true, "header": true, "footer": true,
	"blockquote": true, "pre": true, "table": true, "ul": true, "ol": true, "title": true,
}

// inlineTags are the phrasing elements that may sit inside a word
// ("un<i>believ</i>able", "<a>link</a>s", "H<sub>2</sub>O"): their tags
// separate nothing. Every other tag separates words, as a table cell does.
var inlineTags = map[string]bool{
	"a": true, "abbr": true, "b": true, "bdi": true, "bdo": true, "cite": true, "code": true,
	"data": true, "del": true, "dfn": true, "em": true, "font": true, "i": true, "ins": true,
	"kbd": true, "mark": true, "q": true, "s": true, "samp": true, "small": true, "span": true,
	"strong": true, "sub": true, "sup": true, "time": true, "u": true, "var": true, "wbr": true,
}

// htmlText strips tags, scripts and styles, keeping text and line breaks at
// block elements.
func htmlText(data []byte) string {
	z := html.NewTokenizer(bytes.NewReader(data))
	var b strings.Builder
	skip := 0
	for {
		switch tt := z.Next(); tt {
		case html.ErrorToken:
			return collapseBlankLines(b.String())
		case html.StartTagToken, html.SelfClosingTagToken, html.EndTagToken:
			name, _ := z.TagName()
			tag := string(name)
			if tag == "script" || tag == "style" || tag == "noscript" || tag == "template" {
				if tt != html.EndTagToken {
					skip++
				} else if skip > 0 {
					skip--
				}
			}
			switch {
			case blockTags[tag]:
				b.WriteByte('\n')
			case !inlineTags[tag]:
				b.WriteByte(' ')
			}
		case html.TextToken:
			if skip == 0 {
				// Whitespace in the source, line breaks included, is
				// layout: it separates words, nothing more.
				b.WriteString(strings.Map(func(r rune) rune {
					if unicode.IsSpace(r) {
						return ' '
					}
					return r
				}, string(z.Text())))
			}
		}
	}
}

func collapseBlankLines(s string) string {
	lines := strings.Split(s, "\n")
	out := lines[:0]
	for _, l := range lines {
		if l = strings.Join(strings.Fields(l), " "); l != "" {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
