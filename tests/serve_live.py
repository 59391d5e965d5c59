"""A uvicorn server in a thread on a loopback socket it keeps (no bind-port-0-close-rebind race)."""

from __future__ import annotations

import socket
import threading
import time

from saesteer.serve import make_app

KEY = "sk-test-key"


class Live:
    def __init__(self, model, tok, served, cfg, saes=None):
        import uvicorn

        self.app = make_app(model, tok, served, cfg, saes=saes)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 20, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key=KEY):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.engine.close()
        self.sock.close()
