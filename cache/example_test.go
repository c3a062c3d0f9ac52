package cache_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"log"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/cache"
)

func ExampleFetch() {
	ctx := context.Background()
	rdb := exampleRedis() // in production: the cache's Redis client, owned and closed by main
	defer rdb.Close()
	c, err := cache.New(cache.Config{Redis: rdb, Prefix: examplePrefix()})
	if err != nil {
		log.Fatal(err)
	}

	type Document struct {
		ID     string `json:"id"`
		Status string `json:"status"`
	}
	status := "uploaded" // the database
	loadDocument := func(ctx context.Context) (Document, error) {
		fmt.Println("query the database")
		return Document{ID: "d1", Status: status}, nil
	}
	read := func() {
		doc, err := cache.Fetch(ctx, c, "document:d1", 0, loadDocument)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(doc.ID, doc.Status)
	}

	read() // a miss: loads and caches
	read() // a hit

	// The projector commits a change, then invalidates the key.
	status = "processed"
	if err := c.Invalidate(ctx, "document:d1"); err != nil {
		log.Fatal(err)
	}
	read()

	// Output:
	// query the database
	// d1 uploaded
	// d1 uploaded
	// query the database
	// d1 processed
}

func ExampleLLM_Do() {
	ctx := context.Background()
	rdb := exampleRedis()
	defer rdb.Close()
	c, err := cache.New(cache.Config{Redis: rdb, Prefix: examplePrefix()})
	if err != nil {
		log.Fatal(err)
	}
	llm, err := cache.NewLLM(cache.LLMConfig{Cache: c})
	if err != nil {
		log.Fatal(err)
	}

	callModel := func(ctx context.Context) (string, error) {
		fmt.Println("call the model")
		return "An invoice from ACME for 120 EUR.", nil
	}
	req := cache.LLMRequest{
		Model:  "gpt-4o-mini",
		Params: map[string]any{"temperature": 0, "max_tokens": 64},
		Prompt: "Summarise this document in one sentence.",
	}
	for _, prompt := range []string{
		"Summarise this document in one sentence.",
		"  Summarise this document\nin one sentence. ", // the same prompt, once normalised
	} {
		req.Prompt = prompt
		answer, err := llm.Do(ctx, req, callModel)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(answer)
	}

	// Output:
	// call the model
	// An invoice from ACME for 120 EUR.
	// An invoice from ACME for 120 EUR.
}

// exampleRedis connects to the Redis that TestMain got from testenv.
func exampleRedis() *redis.Client {
	opt, err := redis.ParseURL(exampleRedisURL)
	if err != nil {
		log.Fatal(err)
	}
	return redis.NewClient(opt)
}

// examplePrefix keeps each run of an example to keys of its own, since the
// Redis may be shared.
func examplePrefix() string {
	return "example:" + rand.Text() + ":"
}
