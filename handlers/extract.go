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

// kind is how the text of a content type is extracted.
type kind int

const (
	kindNone kind = iota // not a text document
	kindText             // the bytes are the text
	kindCSV
	kindJSON
	kindHTML
)

// kinds maps a content type to its extraction. A detected type not listed
// takes the kind of its nearest listed ancestor in mimetype's tree, so that
// application/geo+json is JSON and text/vtt, message/rfc822 or
// text/tab-separated-values are text.
var kinds = map[string]kind{
	"text/plain":            kindText,
	"text/csv":              kindCSV,
	"application/json":      kindJSON,
	"application/x-ndjson":  kindJSON, // a stream of JSON values; its parent is text/plain
	"text/html":             kindHTML,
	"application/xhtml+xml": kindHTML, // its parent is text/xml
}

// binaryTops are the top-level media types refused even when mimetype files
// them under text/plain (SVG, ASCII Netpbm): they are pictures, not text.
var binaryTops = []string{"image/", "audio/", "video/", "model/", "font/"}

// textNames are the file name extensions that say what text a document is.
var textNames = map[string]string{".txt": "text/plain", ".text": "text/plain", ".md": "text/markdown", ".markdown": "text/markdown"}

// sniff returns the content type of data and how to extract its text. The
// bytes decide, except that the name tells Markdown from plain text, which
// no byte signature can, and that a .txt or .md name wins over a CSV or TSV
// guess: that guess rests on commas or tabs in the first lines, which
// letters and Markdown tables have too.
func sniff(data []byte, filename string) (string, kind) {
	m := mimetype.Detect(data)
	ct, _, _ := strings.Cut(m.String(), ";")
	for _, top := range binaryTops {
		if strings.HasPrefix(ct, top) {
			return ct, kindNone
		}
	}
	k := kindNone
	for a := m; a != nil; a = a.Parent() {
		base, _, _ := strings.Cut(a.String(), ";")
		if found, ok := kinds[base]; ok {
			k = found
			break
		}
	}
	if named := textNames[strings.ToLower(filepath.Ext(filename))]; named != "" {
		switch ct {
		case "text/plain", "text/csv", "text/tab-separated-values":
			return named, kindText
		}
	}
	return ct, k
}

// Extract sniffs the content type of a document and, for text-like
// documents, extracts its text and counts words and lines. Unsupported or
// corrupt input is an errUnprocessable.
//
// The text never holds a C0 control character other than tab, LF and CR:
// the others (NUL above all, which PostgreSQL text cannot hold and which a
// JSON \u0000 escape produces) become spaces. CRLF line ends become LF.
//
// A document sniffed as CSV that encoding/csv cannot read is, if it is
// valid UTF-8 and not named .csv, processed as text/plain: sniffing guessed
// CSV from commas, and the text is still text. Named .csv, it fails as
// corrupt CSV, which tells its author something true.
func Extract(data []byte, filename string) (Extraction, error) {
	if len(data) == 0 {
		return Extraction{}, unprocessable("the document is empty")
	}
	ct, k := sniff(data, filename)
	var text string
	switch k {
	case kindText:
		if !utf8.Valid(data) {
			return Extraction{ContentType: ct}, unprocessable("text is not valid UTF-8")
		}
		text = cleanText(data)
	case kindCSV:
		t, err := csvText(data)
		switch {
		case err == nil:
			text = cleanText(t)
		case strings.EqualFold(filepath.Ext(filename), ".csv") || !utf8.Valid(data):
			return Extraction{ContentType: ct}, unprocessable("corrupt CSV: %v", err)
		default:
			ct, text = "text/plain", cleanText(data)
		}
	case kindJSON:
		t, err := jsonText(data)
		if err != nil {
			return Extraction{ContentType: ct}, unprocessable("corrupt JSON: %v", err)
		}
		text = cleanText(t)
	case kindHTML:
		if !utf8.Valid(data) {
			return Extraction{ContentType: ct}, unprocessable("HTML is not valid UTF-8")
		}
		text = cleanText(htmlText(data))
	default:
		return Extraction{ContentType: ct}, unprocessable("unsupported content type %s: only text documents (plain text, Markdown, CSV, JSON, HTML and the like) are processed", ct)
	}
	words, lines := countWordsLines(text)
	return Extraction{ContentType: ct, Text: text, Words: words, Lines: lines}, nil
}

// isControl reports the C0 control characters that text must not hold:
// all but tab, LF and CR.
func isControl[B byte | rune](c B) bool {
	return c < 0x20 && c != '\t' && c != '\n' && c != '\r'
}

// cleanText returns s as a string with CRLF made LF, the control characters
// of isControl made spaces, and surrounding whitespace trimmed. It copies s
// at most once: a 32 MiB document is charged 32 MiB in flight.
func cleanText[S string | []byte](s S) string {
	dirty := false
	for i := 0; i < len(s) && !dirty; i++ {
		dirty = isControl(s[i]) || s[i] == '\r' && i+1 < len(s) && s[i+1] == '\n'
	}
	if !dirty {
		return strings.TrimSpace(string(s))
	}
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\r' && i+1 < len(s) && s[i+1] == '\n':
		case isControl(c):
			b.WriteByte(' ')
		default:
			b.WriteByte(c)
		}
	}
	return strings.TrimSpace(b.String())
}

// isSeparator reports what separates words: white space as strings.Fields
// sees it, and control characters.
func isSeparator(r rune) bool { return unicode.IsSpace(r) || isControl(r) }

// countWordsLines counts the words of text (as isSeparator splits them,
// which for text from cleanText is as strings.Fields would) and its lines,
// in one pass that allocates nothing: strings.Fields builds a 16-byte string
// header per word, 8 times the size of a text of one-letter lines.
func countWordsLines(text string) (words, lines int) {
	if text == "" {
		return 0, 0
	}
	inWord := false
	for i := 0; i < len(text); {
		var sep bool
		if c := text[i]; c < utf8.RuneSelf {
			sep = c <= ' ' // ASCII white space and control characters
			if c == '\n' {
				lines++
			}
			i++
		} else {
			r, size := utf8.DecodeRuneInString(text[i:])
			sep = unicode.IsSpace(r)
			i += size
		}
		if !sep && !inWord {
			words++
		}
		inWord = !sep
	}
	return words, lines + 1
}

// writeWords writes the words of s, as isSeparator splits them, separated
// by one space, and reports whether it wrote any.
func writeWords(b *strings.Builder, s string) bool {
	wrote := false
	for w := range strings.FieldsFuncSeq(s, isSeparator) {
		if wrote {
			b.WriteByte(' ')
		}
		b.WriteString(w)
		wrote = true
	}
	return wrote
}

// csvText puts each record on a line, its fields separated by spaces. A
// quoted field may hold line breaks; they become spaces, so that the line
// count is the record count.
func csvText(data []byte) (string, error) {
	r := csv.NewReader(bytes.NewReader(data))
	r.FieldsPerRecord = -1
	r.LazyQuotes = false
	r.ReuseRecord = true
	var b strings.Builder
	b.Grow(len(data))
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
			writeWords(&b, field)
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
	b.Grow(len(data))
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
				// layout: it separates words, nothing more. Line breaks
				// become spaces here; collapseBlankLines collapses the
				// rest.
				for _, c := range z.Text() {
					if c == '\n' {
						c = ' '
					}
					b.WriteByte(c)
				}
			}
		}
	}
}

// collapseBlankLines collapses the white space of each line of s into
// single spaces and drops the lines left empty.
func collapseBlankLines(s string) string {
	var b strings.Builder
	b.Grow(len(s))
	for line := range strings.SplitSeq(s, "\n") {
		first := true
		for w := range strings.FieldsFuncSeq(line, isSeparator) {
			switch {
			case !first:
				b.WriteByte(' ')
			case b.Len() > 0:
				b.WriteByte('\n')
			}
			b.WriteString(w)
			first = false
		}
	}
	return b.String()
}
