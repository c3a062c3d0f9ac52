package blob_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"strings"

	"github.com/conveyor/conveyor/blob"
)

func ExampleDir() {
	root, err := os.MkdirTemp("", "blob-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(root)

	store, err := blob.NewDir(blob.DirConfig{Dir: root})
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()

	// An upload is streamed from any reader, here capped at 1 MiB.
	info, err := store.Put(ctx, strings.NewReader("hello, conveyor"), 1<<20)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("key:", info.Key)
	fmt.Println("size:", info.Size, "created:", info.Created)

	// The same bytes again are stored once.
	again, err := store.Put(ctx, strings.NewReader("hello, conveyor"), 1<<20)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("same key:", again.Key == info.Key, "created:", again.Created)

	rc, err := store.Open(ctx, info.Key)
	if err != nil {
		log.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("content:", string(b))

	_, err = store.Put(ctx, strings.NewReader("too long"), 3)
	fmt.Println("too large:", errors.Is(err, blob.ErrTooLarge))

	// Output:
	// key: a4773d102326c0b9e0f83094189b66b6d589424631e87dd196f43a648927a766
	// size: 15 created: true
	// same key: true created: false
	// content: hello, conveyor
	// too large: true
}
