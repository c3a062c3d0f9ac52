package store_test

import (
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/store"
)

// TestReadersSurviveAnAddedColumn: during a rolling deploy, binaries built
// before a migration keep reading the tables it changed. A column they do
// not know must not break their reads (sqlx refuses a row with a column the
// struct lacks: "missing destination name pages in *store.Document").
func TestReadersSurviveAnAddedColumn(t *testing.T) {
	t.Parallel()
	st, db := newStore(t)
	ctx := t.Context()
	doc, mail := events.NewID(), events.NewID()
	uploadID := events.NewID()
	if err := st.WithTx(ctx, func(tx *store.Tx) error {
		if err := tx.ApplyDocumentsUploaded(ctx, []*events.DocumentUploaded{uploaded(doc)}, []string{uploadID}); err != nil {
			return err
		}
		return tx.ApplyEmailsRequested(ctx, []*events.EmailRequested{requested(mail)})
	}); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		"ALTER TABLE documents ADD COLUMN pages integer",
		"ALTER TABLE documents ADD COLUMN zzz_note text DEFAULT 'new'",
		"ALTER TABLE emails ADD COLUMN opened_at timestamptz",
	} {
		if _, err := db.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}

	d, err := st.Document(ctx, doc)
	if err != nil {
		t.Errorf("Document after a column was added: %v", err)
	} else if d.DocID != doc || d.Status != store.DocumentProcessing || d.UploadEventID.String != uploadID {
		t.Errorf("Document = %+v", d)
	}
	e, err := st.Email(ctx, mail)
	if err != nil {
		t.Errorf("Email after a column was added: %v", err)
	} else if e.EmailID != mail || e.Status != store.EmailQueued {
		t.Errorf("Email = %+v", e)
	}
	stuck, err := st.StuckDocuments(ctx, at.Add(time.Hour), time.Time{}, "", 10)
	if err != nil {
		t.Errorf("StuckDocuments after a column was added: %v", err)
	} else if len(stuck) != 1 || stuck[0].DocID != doc || stuck[0].UploadEventID.String != uploadID || stuck[0].BlobKey.String != blob {
		t.Errorf("StuckDocuments = %+v, want the one document with its upload event id and blob", stuck)
	}
}

// TestColumnLists: the getters name their columns; the lists must name
// every field of the structs, or a field would silently stay empty.
func TestColumnLists(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		typ     reflect.Type
		columns string
	}{
		{name: "documents", typ: reflect.TypeFor[store.Document](), columns: store.DocumentColumns},
		{name: "emails", typ: reflect.TypeFor[store.Email](), columns: store.EmailColumns},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var tags []string
			for i := range tt.typ.NumField() {
				tags = append(tags, tt.typ.Field(i).Tag.Get("db"))
			}
			var cols []string
			for c := range strings.SplitSeq(tt.columns, ",") {
				cols = append(cols, strings.TrimSpace(c))
			}
			slices.Sort(tags)
			slices.Sort(cols)
			if !slices.Equal(cols, tags) {
				t.Errorf("columns %q, want the db tags %q", cols, tags)
			}
		})
	}
}
