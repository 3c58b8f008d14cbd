#!/usr/bin/env python3
"""A loopback mock of the Anthropic Messages API, enough for the real Claude Code CLI.

Usage: mock_anthropic.py DIR. Listens on 127.0.0.1 (a free port), writes the port to
DIR/port once it listens, appends one JSON line per POST to DIR/requests.jsonl
({"path", "n_messages", "user_texts", "t" (seconds since the epoch), "answer"}), and
answers each POST as DIR/mode says at that moment (read per request; missing = ok):

  ok      a streamed answer (message_start, content_block_start, content_block_delta,
          content_block_stop, message_delta, message_stop) saying "turn N: <last text>"
  529     HTTP 529 overloaded_error
  429     HTTP 429 rate_limit_error, with anthropic-ratelimit reset headers
  hang    message_start, then nothing until the client goes away
  529*K   (or 429*K) the next K requests as 529 (429), then ok; writing the mode again
          starts a new count
  529@S   (or 429@S) 529 (429) until S seconds after the mode file was written, then ok

DIR/output_tokens, if present, is the answer's output token count (default 5): claude
computes the run's cost from it (opus: $25 per million).

`HEAD /` (the client's reachability probe) answers 200. Python 3 standard library only.
"""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIR = sys.argv[1]
LOCK = threading.Lock()
# Requests answered per "CODE*K" mode, by the mode file's text and modification time.
COUNTS = {}


def mode():
    try:
        path = os.path.join(DIR, "mode")
        with open(path) as f:
            text = f.read().strip() or "ok"
        stamp = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return "ok"
    if "@" in text:
        code, secs = text.split("@", 1)
        return code if time.time() < stamp / 1e9 + float(secs) else "ok"
    if "*" not in text:
        return text
    code, k = text.split("*", 1)
    key = (text, stamp)
    COUNTS[key] = COUNTS.get(key, 0) + 1
    return code if COUNTS[key] <= int(k) else "ok"


def output_tokens():
    try:
        with open(os.path.join(DIR, "output_tokens")) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return 5


def texts(content):
    if isinstance(content, str):
        return [content]
    return [c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text"]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        self.do_HEAD()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        messages = body.get("messages", [])
        user = [" ".join(texts(m.get("content", []))) for m in messages if m.get("role") == "user"]
        with LOCK, open(os.path.join(DIR, "requests.jsonl"), "a") as log:
            m = mode()
            log.write(json.dumps({"path": self.path, "n_messages": len(messages), "user_texts": user,
                                  "t": time.time(), "answer": m}) + "\n")
        if m in ("529", "429"):
            kind = "overloaded_error" if m == "529" else "rate_limit_error"
            payload = json.dumps({"type": "error", "error": {"type": kind, "message": kind}}).encode()
            self.send_response(int(m))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if m == "429":
                self.send_header("retry-after", "3600")
                self.send_header("anthropic-ratelimit-unified-reset", str(int(time.time()) + 3600))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        last = user[-1] if user else ""
        message = {
            "id": "msg_mock", "type": "message", "role": "assistant", "model": body.get("model", "mock"),
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1},
        }
        self.event("message_start", {"type": "message_start", "message": message})
        if m == "hang":
            try:
                while True:
                    time.sleep(0.5)
                    self.wfile.write(b": ping\n\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
        text = "turn %d: %s" % (len(user), last[-200:])
        self.event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})
        self.event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": text}})
        self.event("content_block_stop", {"type": "content_block_stop", "index": 0})
        self.event("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                     "usage": {"output_tokens": output_tokens()}})
        self.event("message_stop", {"type": "message_stop"})

    def event(self, name, data):
        self.wfile.write(("event: %s\ndata: %s\n\n" % (name, json.dumps(data))).encode())
        self.wfile.flush()


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
tmp = os.path.join(DIR, "port.tmp")
with open(tmp, "w") as f:
    f.write(str(server.server_address[1]))
os.rename(tmp, os.path.join(DIR, "port"))
server.serve_forever()
