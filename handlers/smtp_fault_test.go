package handlers_test

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/handlers"
)

// faultySMTP is an SMTP server that answers the end of a message's DATA
// with endOfData, then drops the connection at the next command (an RSET
// or the QUIT a client sends after a message): a server that fails, or a
// network that breaks, just after its verdict on a mail. Mailpit cannot
// fail that way. It sends each message it accepted on the channel.
func faultySMTP(t *testing.T, endOfData string) (addr string, accepted <-chan string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	got := make(chan string, 8)
	serve := func(c net.Conn) {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Minute))
		r := bufio.NewReader(c)
		reply := func(lines ...string) { fmt.Fprint(c, strings.Join(lines, "\r\n")+"\r\n") }
		reply("220 faulty ESMTP")
		verdict := false
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			switch cmd := strings.ToUpper(strings.TrimSpace(line)); {
			case strings.HasPrefix(cmd, "EHLO"):
				reply("250-faulty", "250 8BITMIME")
			case verdict:
				return // RSET, QUIT, anything after the verdict: the connection drops
			case strings.HasPrefix(cmd, "HELO"), strings.HasPrefix(cmd, "MAIL FROM"), strings.HasPrefix(cmd, "RCPT TO"),
				cmd == "NOOP", cmd == "RSET":
				reply("250 ok")
			case cmd == "DATA":
				reply("354 go on")
				var msg strings.Builder
				for {
					l, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if l == ".\r\n" {
						break
					}
					msg.WriteString(l)
				}
				if strings.HasPrefix(endOfData, "250") {
					got <- msg.String()
				}
				reply(endOfData)
				verdict = true
			default:
				reply("502 not implemented")
			}
		}
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serve(c)
		}
	}()
	return ln.Addr().String(), got
}

// A mail the server accepted is sent, whatever happens to the connection
// after: an error there must not make the email sender send it again. A
// mail the server rejected for good is a permanent error.
func TestSMTPVerdictIsTheEndOfDATA(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, endOfData string
		wantErr         bool
	}{
		{name: "accepted, then the connection drops", endOfData: "250 2.0.0 queued"},
		{name: "rejected, then the connection drops", endOfData: "554 5.7.1 rejected", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			addr, accepted := faultySMTP(t, tt.endOfData)
			m := handlers.Mail{ID: events.NewID(), From: "conveyor@localhost", To: "reader@example.com",
				Subject: tt.name, Body: "Body.", Date: time.Now()}
			err := newSMTP(t, "smtp://"+addr+"?tls=none").Send(t.Context(), m)
			if tt.wantErr {
				if err == nil || !bus.IsPermanent(err) {
					t.Fatalf("Send = %v, want a permanent error", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Send = %v, want success: the server accepted the mail", err)
			}
			select {
			case msg := <-accepted:
				if !strings.Contains(msg, "Subject: "+tt.name) {
					t.Fatalf("the server accepted %q, not this mail", msg)
				}
			default:
				t.Fatal("Send succeeded, but the server accepted nothing")
			}
		})
	}
}
