"""One debit that crosses a wallet's auto top-up threshold, from a process of its own, for
tests/test_auto_top_up.py: the test SIGKILLs this process once the automatic purchase's row exists,
so the Stripe call (on the worker thread) is cut before it is made, or while Stripe answers.

    python _top_up_worker.py DATABASE_URL CONFIG_JSON USER AMOUNT

prints ``spent <entry id>`` once the debit committed, then waits to be killed (at most 60 s).
"""

from __future__ import annotations

import json
import sys
import time

from helpers import make_app


def main() -> None:
    url, config, user, amount = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    app, _, credits = make_app(url, **config)
    with app.app_context():
        entry = credits.spend(user, amount, reason="work")
        print(f"spent {entry.id}", flush=True)
        time.sleep(60)


if __name__ == "__main__":
    main()
