package main_test

import (
	"os"
	"testing"

	"github.com/conveyor/conveyor/internal/harness"
	"github.com/conveyor/conveyor/internal/testenv"
)

func TestMain(m *testing.M) {
	code := testenv.Wrap(m).Run()
	harness.Cleanup()
	os.Exit(code)
}
