#!/usr/bin/env python3
"""An independent HTTP/1.1 reading of byte streams, by h11 (strict, sans-I/O), for malla's
differential tests (tests/tests/it/smuggling.rs).

A long-running process: one JSON object per line on stdin, one JSON object per line on
stdout, in order.

    in:  {"id": 7, "role": "server", "data": "<base64>"}
    out: {"id": 7,
          "requests": [{"method": "POST", "target": "/x", "version": "1.1",
                        "headers": [["host", "a"], ...], "body": "<base64>"}, ...],
          "error": null | {"kind": "protocol" | "eof", "message": "...", "status": 400},
          "trailing": 0}

`data` is everything a server receives on one connection, then the connection closes.
`requests` are the complete requests h11 reads, in order (a response is sent for each so
the next one can be read). `error` is where h11 stops: "protocol" when it refuses the bytes
(with the status it suggests), "eof" when the stream ends inside a message. `trailing`
counts bytes after a message that ends the connection (HTTP/1.0, `Connection: close`).
Strings carry bytes as latin-1 (every byte one character).

The first line written is {"ready": true, "h11": "<version>"}.
"""

import base64
import json
import sys

try:
    import h11
except ImportError:
    sys.stderr.write(
        "h11 is not installed for this Python (%s). Install it: Debian/Ubuntu "
        "`apt-get install python3-h11` (then use /usr/bin/python3), or "
        "`python3 -m pip install h11`; scripts/test does this. MALLA_PYTHON names the "
        "interpreter the tests use.\n" % sys.executable
    )
    sys.exit(3)


def text(b):
    return bytes(b).decode("latin-1")


def read_as_server(data):
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    conn.receive_data(data)
    eof_sent = False
    requests = []
    current = None
    error = None
    trailing = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            kind = "eof" if eof_sent else "protocol"
            error = {"kind": kind, "message": str(e), "status": e.error_status_hint}
            break
        if event is h11.NEED_DATA:
            if eof_sent:
                # h11 asks for more after the end: only when idle at a boundary.
                break
            conn.receive_data(b"")
            eof_sent = True
            continue
        if event is h11.PAUSED:
            # Waiting for our response to a request already complete: answer it.
            if current is None and conn.their_state in (h11.DONE, h11.MIGHT_SWITCH_PROTOCOL):
                conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                conn.send(h11.EndOfMessage())
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    trailing = len(conn.trailing_data[0])
                    break
                conn.start_next_cycle()
                continue
            error = {"kind": "protocol", "message": "h11 paused in state %s/%s"
                     % (conn.our_state, conn.their_state), "status": 400}
            break
        if isinstance(event, h11.ConnectionClosed):
            break
        if isinstance(event, h11.Request):
            current = {
                "method": text(event.method),
                "target": text(event.target),
                "version": text(event.http_version),
                "headers": [[text(n), text(v)] for n, v in event.headers.raw_items()],
                "body": bytearray(),
            }
        elif isinstance(event, h11.Data):
            current["body"] += event.data
        elif isinstance(event, h11.EndOfMessage):
            current["body"] = base64.b64encode(bytes(current["body"])).decode("ascii")
            requests.append(current)
            current = None
            conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                trailing = len(conn.trailing_data[0])
                break
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError as e:
                error = {"kind": "protocol", "message": str(e), "status": 400}
                break
    return {"requests": requests, "error": error, "trailing": trailing}


def main():
    out = sys.stdout
    out.write(json.dumps({"ready": True, "h11": h11.__version__}) + "\n")
    out.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        msg = json.loads(line)
        if msg.get("role", "server") != "server":
            reply = {"error": {"kind": "usage", "message": "only role=server is supported"}}
        else:
            data = base64.b64decode(msg["data"])
            try:
                reply = read_as_server(data)
            except h11.LocalProtocolError as e:
                reply = {"requests": [], "error": {"kind": "protocol", "message": str(e),
                                                   "status": e.error_status_hint}, "trailing": 0}
        reply["id"] = msg.get("id")
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
