"""The command: run every section on each database, print the tables, optionally write the report."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from pathlib import Path

from . import env, loads, peers, prepares, profiling, queries, scale, web, webhooks
from .app import BIG, build_app
from .report import BackendReport, Check, Table, checks_table, ms, num, pct, pct_range, text_table
from .settings import FULL, QUICK, Settings
from .timing import Measurement
from .writer import render, write_report

#: A balance or history page counts as flat when its median at the largest size is at most this
#: multiple of its median at the smallest (a linear cost would be 100x from 10k to 1M entries).
FLAT = 1.5


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes and short runs (CI smoke test)")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "all"], default="all")
    parser.add_argument(
        "--write", metavar="PATH", help="write the report (markdown), e.g. docs/benchmarks.md"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile spend() and a decorated request (pyinstrument)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # A SIGTERM (a CI timeout) unwinds like Ctrl-C: the databases and gunicorn made by the run go away.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    settings = dataclasses.replace(QUICK if args.quick else FULL, profile=args.profile)
    backends = ["sqlite", "postgresql"] if args.db == "all" else [args.db]
    info = env.machine()
    began = time.perf_counter()
    reports = []
    for backend in backends:
        log(f"--- {backend}")
        report = run_backend(backend, settings)
        reports.append(report)
        for table in report.tables:
            print(text_table(table), end="\n\n", flush=True)
    targets = checks_table(reports)
    print(text_table(targets))
    info["load average at end"] = env.loadavg()
    info["duration"] = f"{time.perf_counter() - began:.0f} s" + (" (--quick)" if settings.quick else "")
    if args.write:
        command = (
            "python -m bench"
            + (" --quick" if args.quick else "")
            + (f" --db {args.db}" if args.db != "all" else "")
            + (" --profile" if args.profile else "")
            + f" --write {args.write}"
        )
        write_report(Path(args.write), render(info, reports, targets, settings, command, FLAT))
        log(f"wrote {args.write}")
    return 0


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_backend(backend: str, settings: Settings) -> BackendReport:
    target = env.create_target(backend)
    try:
        report = BackendReport(backend, env.database_version(target))
        app, db, credits = build_app(target.url, pool_size=settings.threads + 2)
        try:
            with app.app_context():
                db.create_all()
            log("debits: floor, limit, spend() and the peers")
            wallet_ids = loads.prepare_wallets(app, credits, settings)
            with app.app_context():
                for i in range(settings.threads):
                    credits.grant(f"web-{i}", BIG, reason="bench")
            pg = backend == "postgresql"
            floor_ids = loads.prepare_floor(target, settings) if pg else {}
            peer_list, report.skipped = peers.prepare(
                target, loads.peer_names(settings), settings.threads + 2
            )
            for reason in report.skipped:
                log(f"peer skipped: {reason}")
            try:
                results = loads.run_loads(target, app, credits, settings, wallet_ids, floor_ids, peer_list)
            finally:
                for peer in peer_list:
                    peer.close()
            log("requests: in process")
            one, _, many = loads.loads(settings)
            inproc = web.in_process(
                app,
                settings,
                loads.limit_run(target, one, settings, wallet_ids),
                loads.floor_run(target, one, settings, floor_ids) if pg else None,
            )
            log("requests: gunicorn")
            served = web.through_server(
                target,
                settings,
                loads.limit_run(target, many, settings, wallet_ids),
                loads.floor_run(target, many, settings, floor_ids) if pg else None,
            )
            log("webhooks")
            hooks = webhooks.run(app, credits, settings)
            profile = None
            if settings.profile:
                log("profile")
                profile = profiling.run(app, credits, target)
            problems = loads.audit_spend_wallets(app, credits, wallet_ids)
            if problems:
                raise RuntimeError("audit after the loads: " + "; ".join(problems[:5]))
            log("queries per operation")
            rows, mixed = queries.run(target, settings.query_repeat)
        finally:
            with app.app_context():
                db.engine.dispose()
        counts = {row.name: row.counts for row in rows}
        report.tables.extend(debit_tables(results, counts, backend == "postgresql"))
        report.tables.append(peers_table(results, peer_list, report.skipped, backend == "postgresql"))
        report.tables.append(request_table(inproc, served))
        report.tables.append(webhook_table(hooks, rows, results[0]))
        report.tables.append(queries_table(rows, mixed, backend, settings.query_repeat))
        if profile is not None:
            report.tables.append(profile)
        if backend == "postgresql":
            log("spend() with and without server-side prepared statements")
            report.tables.append(prepares_table(run_prepares(backend, settings)))
        log("scale")
        grown = run_scale(backend, settings)
        report.tables.extend(scale_tables(grown))
        report.checks = checks(results, inproc, served, rows, grown, backend == "postgresql", hooks)
    finally:
        target.drop()
    return report


def run_prepares(backend: str, settings: Settings) -> list[prepares.PrepareResult]:
    target = env.create_target(backend)
    try:
        return prepares.run(target, settings)
    finally:
        target.drop()


def run_scale(backend: str, settings: Settings) -> scale.ScaleResult:
    target = env.create_target(backend)
    try:
        app, db, credits = build_app(target.url, pool_size=2)
        with app.app_context():
            db.create_all()
        try:
            result = scale.run(target, app, credits, settings)
        finally:
            with app.app_context():
                db.engine.dispose()
    finally:
        target.drop()
    if result.audit:
        raise RuntimeError("audit after the scale load: " + "; ".join(result.audit[:5]))
    return result


# -- tables ------------------------------------------------------------------------------------------


def debit_tables(results: list[loads.LoadResult], counts: dict[str, queries.Counts], pg: bool) -> list[Table]:
    if pg:
        main = Table(
            "Debits: credits.spend() against the one-statement floor (the reference) and the hand-written"
            " three-round-trip debit (second reference)",
            [
                "load",
                "floor ops/s",
                "p50 ms",
                "3-round-trip debit ops/s",
                "p50 ms",
                "spend() ops/s",
                "p50 ms",
                "p99 ms",
                "spend() / floor",
                "per round",
                "spend() / 3-round-trip",
            ],
        )
        for r in results:
            assert r.floor is not None
            main.rows.append(
                [
                    r.load.name,
                    num(r.floor.throughput),
                    ms(r.floor.p50),
                    num(r.limit.throughput),
                    ms(r.limit.p50),
                    num(r.spend.throughput),
                    ms(r.spend.p50),
                    ms(r.spend.p99),
                    pct(r.ratio),
                    pct_range(r.round_ratios),
                    pct(r.limit_ratio),
                ]
            )
        main.notes.append(
            "floor (the reference of every ratio on PostgreSQL): " + FLOOR_NOTE + " 3-round-trip debit"  # noqa: S608
            ' (second reference, the earlier "limit"): BEGIN; UPDATE credits_wallets SET balance ='
            " balance - 1 WHERE id = ? AND balance >= 1 RETURNING balance; INSERT INTO credits_entries"
            " (...); COMMIT, raw psycopg, on the ledger's own tables."
        )
    else:
        main = Table(
            "Debits: credits.spend() against the hand-written limit",
            [
                "load",
                "limit ops/s",
                "p50 ms",
                "p99 ms",
                "spend() ops/s",
                "p50 ms",
                "p99 ms",
                "spend() / limit",
                "per round",
            ],
        )
        for r in results:
            main.rows.append(
                [
                    r.load.name,
                    num(r.limit.throughput),
                    ms(r.limit.p50),
                    ms(r.limit.p99),
                    num(r.spend.throughput),
                    ms(r.spend.p50),
                    ms(r.spend.p99),
                    pct(r.ratio),
                    pct_range(r.round_ratios),
                ]
            )
        main.notes.append(
            "limit (the reference on SQLite, which has no data-modifying WITH): UPDATE credits_wallets SET"
            " balance = balance - 1 WHERE id = ? AND balance >= 1 RETURNING balance; INSERT INTO"
            " credits_entries (...); COMMIT, on one raw sqlite3 connection per thread, same schema and file."
        )
    main.notes.append(
        "spend(): credits.spend(user_id, 1, reason=...) through the pool; every wallet holds one lot."
        " All contenders of the debit, peer and hold tables alternate, round by round, in the same database."
    )
    gap = Table(
        "Where the gap comes from: spend's own SQL without the Python layer (same run)",
        [
            "load",
            "spend's SQL by hand ops/s",
            "p50 ms",
            "/ floor" if pg else "/ limit",
            "spend() / spend's SQL by hand",
        ],
    )
    for r in results:
        gap.rows.append(
            [
                r.load.name,
                num(r.spend_sql.throughput),
                ms(r.spend_sql.p50),
                pct(r.sql_ratio),
                pct(r.spend.throughput / r.spend_sql.throughput),
            ]
        )
    gap.notes.append(
        "spend's SQL by hand: what spend() sends when the wallet's soonest lot covers the debit, with the"
        " raw driver. "
        + (
            "PostgreSQL: the ledger's own one-statement debit (flask_credits.storage.statements.SPEND:"
            " WITH w AS (UPDATE wallet ... RETURNING), l AS (UPDATE lot), e AS (INSERT entry),"
            " d AS (INSERT draw) SELECT ...) on a psycopg connection with autocommit=True: one statement,"
            " one round trip, its own transaction."
            if pg
            else "SQLite: UPDATE wallet RETURNING; UPDATE credits_lots ... WHERE id = (SELECT ... LIMIT 1)"
            " AND remaining >= 1 RETURNING id; INSERT entry; INSERT draw; COMMIT."
        )
        + " The last column is what the Python layer (SQLAlchemy, the pool, flask_credits) leaves of it."
    )
    one = results[0]
    ladder = Table(
        "The price of each write, one connection (same run)",
        [
            "debit",
            "statements",
            *(["round trips"] if pg else []),
            "ops/s",
            "p50 ms",
            "/ floor" if pg else "/ limit",
        ],
    )
    spend = counts["spend (fast path)"]
    rungs: list[tuple[str, float, float | None, Measurement | None]] = [
        *(
            [("floor: one WITH (UPDATE wallet, INSERT entry), autocommit, own tables", 1, 1, one.floor)]
            if pg
            else []
        ),
        ("limit: UPDATE wallet, INSERT entry", 2, 4, one.limit),
        ("+ UPDATE the lot", 3, 5, one.ladder.get("ladder3")),
        ("+ INSERT the draw", 4, 6, one.ladder.get("ladder4")),
        (
            "spend's SQL by hand" + (" (one WITH statement, autocommit)" if pg else ""),
            spend.statements,
            spend.round_trips,
            one.spend_sql,
        ),
        ("credits.spend()", spend.statements, spend.round_trips, one.spend),
    ]
    for name, statements, trips, m in rungs:
        if m is None:
            continue
        ladder.rows.append(
            [
                name,
                fmt(statements),
                *(["-" if trips is None else fmt(trips)] if pg else []),
                num(m.throughput),
                ms(m.p50),
                pct(one.against(m)),
            ]
        )
    ladder.notes.append(
        "Each rung adds one write of the ledger's schema to the hand-written limit (raw driver): the rows"
        " spend() writes, in separate statements; then spend()'s own SQL by hand and spend() itself"
        " (their statement" + (" and round-trip counts" if pg else " counts") + " as measured in"
        ' "Statements per operation").'
        + (
            " The rungs' round trips include psycopg's BEGIN and the COMMIT; a statement in autocommit"
            " has neither."
            if pg
            else ""
        )
    )
    return [main, gap, ladder, hold_table(results, counts, pg)]


FLOOR_NOTE = (
    "the cheapest debit one statement in autocommit can make, on tables of its own"
    " (bench_floor_wallets: id, balance; bench_floor_entries: id, wallet_id, amount,"
    " balance_after), raw psycopg with autocommit=True: " + loads.FLOOR.replace("%(id)s", "$1") + "."
    " One round trip, no BEGIN, no COMMIT, and no lot, draw, hold or index beyond the keys."
)


def peers_table(
    results: list[loads.LoadResult], peer_list: list[peers.Peer], skipped: list[str], pg: bool
) -> Table:
    names = [peer.name for peer in peer_list]
    reference = "floor" if pg else "limit"
    table = Table(
        "Peers: the same debit in other credit libraries (same loads, same rounds)",
        [
            "load",
            f"{reference} ops/s",
            "spend() ops/s",
            *(f"{name} ops/s" for name in names),
            f"spend() / {reference}",
            *(f"{name} / {reference}" for name in names),
            "spend() / best peer",
        ],
    )
    for r in results:
        best = r.best_peer
        table.rows.append(
            [
                r.load.name,
                num(r.reference.throughput),
                num(r.spend.throughput),
                *(num(r.peers[name].throughput) for name in names),
                pct(r.ratio),
                *(pct(r.against(r.peers[name])) for name in names),
                "-" if best is None else f"{r.spend.throughput / best[1].throughput:.2f}x",
            ]
        )
    table.notes.extend(f"{peer.name}: {peer.note}" for peer in peer_list)
    table.notes.append(
        "Each peer on its own wallets (one per thread, or one hot wallet), its own tables and its own"
        " engine, with the same 1-credit debit; its wallets never run out."
    )
    table.notes.extend(f"not run: {reason}" for reason in skipped)
    return table


def hold_table(results: list[loads.LoadResult], counts: dict[str, queries.Counts], pg: bool) -> Table:
    reference = "floor" if pg else "limit"
    table = Table(
        "Holds: hold + settle below the hold against the one-statement floor"
        if pg
        else "Holds: hold + settle below the hold against the hand-written limit",
        [
            "load",
            f"{reference} ops/s",
            "p50 ms",
            "spend() / " + reference,
            "hold + settle ops/s",
            "p50 ms",
            "p99 ms",
            "hold + settle / " + reference,
            "per round",
        ],
    )
    for r in results:
        ref = r.floor or r.limit
        rounds = r.hold_round_ratios
        table.rows.append(
            [
                r.load.name,
                num(ref.throughput),
                ms(ref.p50),
                pct(r.spend.throughput / ref.throughput),
                num(r.hold_settle.throughput),
                ms(r.hold_settle.p50),
                ms(r.hold_settle.p99),
                pct(r.hold_ratio),
                pct_range(rounds),
            ]
        )
    hold, settle = counts["hold"], counts["settle below the hold"]
    table.notes.append(
        "hold + settle: one operation is credits.hold(user_id, 2) then credits.settle(hold.id, 1) through"
        f" the pool (hold: {describe(hold)}; settle: {describe(settle)}; the rest of the hold goes back"
        " to its lot); wallets of their own, one lot each, taking turns with the contenders above in"
        " the same rounds."
    )
    if pg:
        table.notes.append("floor: as in the debits table.")
    else:
        table.notes.append("SQLite has no one-statement debit: the reference is the hand-written limit.")
    return table


def prepares_table(results: list[prepares.PrepareResult]) -> Table:
    table = Table(
        "spend() with and without server-side prepared statements (CREDITS_DATABASE_POOLER), direct",
        [
            "load",
            "prepared ops/s",
            "p50 ms",
            "unprepared ops/s",
            "p50 ms",
            "unprepared / prepared",
            "per round",
        ],
    )
    for r in results:
        rounds = [u / p for p, u in zip(r.prepared.rounds, r.unprepared.rounds, strict=True)]
        table.rows.append(
            [
                r.load.name,
                num(r.prepared.throughput),
                ms(r.prepared.p50),
                num(r.unprepared.throughput),
                ms(r.unprepared.p50),
                pct(r.ratio),
                pct_range(rounds),
            ]
        )
    table.notes.append(
        "prepared: psycopg's default, spend()'s one statement prepared on the server after 5 uses."
        ' unprepared: CREDITS_DATABASE_POOLER = "transaction" (prepare_threshold = None), what a transaction'
        " pooler needs: the server parses and plans the statement every time. Two apps on one database, on"
        " direct connections, taking turns in the same rounds; wallets hold one lot each."
    )
    return table


def request_table(inproc: web.WebResult, served: web.WebResult) -> Table:
    ref = "floor" if inproc.floor is not None else "limit"
    table = Table(
        "A trivial view with and without @requires_credits(1)",
        [
            "where",
            "undecorated req/s",
            "p50 ms",
            "decorated req/s",
            "p50 ms",
            "added ms/request",
            "decorated / undecorated",
            f"{ref} ops/s (same rounds)",
            f"decorated / (undecorated + {ref})",
        ],
    )
    for result in (inproc, served):
        table.rows.append(
            [
                result.where,
                num(result.free.throughput),
                ms(result.free.p50),
                num(result.paid.throughput),
                ms(result.paid.p50),
                ms(result.added_ms),
                pct(result.ratio),
                num(result.reference.throughput),
                pct(result.target_ratio),
            ]
        )
    table.notes.append(
        f"undecorated + {ref}: the per-request time of the undecorated view plus that of one {ref}"
        " debit at the same concurrency (one connection in process; N threads on N wallets via gunicorn),"
        f" the {ref} taking turns with the two views in the same rounds. The decorated request's database"
        ' work is one spend() (table "Statements per operation").'
    )
    table.notes.append(
        "added ms/request: mean latency decorated minus undecorated. gunicorn's sync workers close every"
        " connection; the client threads share the machine's cores with the server."
    )
    return table


def webhook_table(
    hooks: webhooks.WebhookResult, rows: list[queries.QueryRow], one: loads.LoadResult
) -> Table:
    by_name = {row.name: row.counts for row in rows}
    table = Table(
        "Webhook fulfilment (in process, signed events, one thread)",
        [
            "delivery",
            "events/s",
            "p50 ms",
            "p99 ms",
            "statements per event",
            "vs floor (one connection)" if one.floor is not None else "vs limit (one connection)",
        ],
    )
    for name, m, key in (
        ("checkout.session.completed (credited)", hooks.fulfil, "webhook checkout.session.completed"),
        ("the same events again (duplicates)", hooks.duplicate, "webhook, duplicate delivery"),
    ):
        table.rows.append(
            [
                name,
                num(m.throughput),
                ms(m.p50),
                ms(m.p99),
                num(by_name[key].statements, 1),
                pct(one.against(m)),
            ]
        )
    table.notes.append(
        f"{hooks.fulfil.ops} purchases started through POST /credits/checkout (Stripe mocked with responses);"
        " each event verified (Stripe-Signature, HMAC), de-duplicated by event id, and credited; every"
        " answer checked: " + ", ".join(f"{k} {v}" for k, v in sorted(hooks.outcomes.items())) + "."
    )
    return table


def queries_table(
    rows: list[queries.QueryRow], mixed: list[queries.QueryRow], backend: str, repeat: int
) -> Table:
    headers = ["operation", "statements", "commits", "rollbacks"]
    if backend == "postgresql":
        headers.append("round trips (libpq trace)")
    headers.append("statements sent")
    table = Table("Statements per operation", headers)
    for row in rows + mixed:
        c = row.counts
        cells = [row.name, fmt(c.statements), fmt(c.commits), fmt(c.rollbacks)]
        if backend == "postgresql":
            cells.append("-" if c.round_trips is None else fmt(c.round_trips))
        cells.append("; ".join(c.sql) if len(c.sql) <= 12 else f"{len(c.sql)} statements")
        table.rows.append(cells)
    if backend == "postgresql":
        table.notes.append(
            "statements: SQLAlchemy before_cursor_execute on the engine. psycopg sends BEGIN itself before"
            " the first statement of each transaction (not an event, but a round trip): round trips are"
            " counted from the libpq protocol trace (Query and Sync messages), BEGIN, COMMIT, ROLLBACK and"
            " DEALLOCATE ALL included."
        )
        table.notes.append(
            "spend() sends one statement in autocommit (no BEGIN, no COMMIT: the statement is its own"
            " transaction; SQLAlchemy still reports the connection's end as a rollback, which sends"
            " nothing). Reads (balance, history, the idempotency and duplicate checks) run in autocommit"
            " too: one round trip each, and no ROLLBACK to make psycopg forget its prepared statements,"
            " so with a read between two spends (last row) the spend's statement stays prepared."
        )
    else:
        table.notes.append(
            "statements: SQLAlchemy before_cursor_execute on the engine; sqlite3 issues BEGIN itself (in"
            " process, not counted) before the first INSERT/UPDATE of a transaction."
        )
    table.notes.append(
        f"Averages over {repeat} calls after {queries.WARMUP} warm-up calls; whole numbers mean every call"
        " sent the same."
    )
    return table


def describe(c: queries.Counts) -> str:
    """Like "4 statements, 1 commit", with the round trips where they were traced."""
    parts = [f"{fmt(c.statements)} statement" + ("" if c.statements == 1 else "s")]
    parts.append(f"{fmt(c.commits)} commit" if c.commits else "autocommit")
    if c.round_trips is not None:
        parts.append(f"{fmt(c.round_trips)} round trip" + ("" if c.round_trips == 1 else "s"))
    return ", ".join(parts)


def same_work(a: queries.Counts, b: queries.Counts) -> bool:
    return all(
        getattr(a, name) == getattr(b, name) for name in ("statements", "commits", "rollbacks", "round_trips")
    )


def fmt(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.1f}"


def scale_tables(result: scale.ScaleResult) -> list[Table]:
    sizes = sorted(next(iter(result.big.values())))
    wallets = result.steps[-1].wallets
    entries = Table(
        f"Scale: wallets of {', '.join(f'{n:,}' for n in sizes)} entries,"
        f" in one database of {wallets:,} wallets",
        ["operation (p50 ms)"] + [f"{n:,} entries" for n in sizes] + ["largest / smallest"],
    )
    for name, timings in result.big.items():
        first, last = timings[sizes[0]].p50, timings[sizes[-1]].p50
        entries.rows.append([name] + [ms(timings[n].p50) for n in sizes] + [f"{last / first:.2f}x"])
    entries.notes.append(
        f"{result.repeat} calls per cell, one thread, all sizes and operations taking turns in"
        f" {scale.ROUNDS} rounds. Rows bulk-loaded with raw SQL (INSERT ... SELECT generate_series on"
        " PostgreSQL, executemany on SQLite); every spend has its draw row. "
        + (
            f"credits.audit() found {len(result.audit)} problems afterwards."
            if result.audit_error is None
            else f"credits.audit() FAILED on this database ({result.audit_error}): it binds one"
            f" parameter per wallet; the same invariants checked with set-based SQL (bench/scale.py"
            f" AUDIT) found {len(result.audit)} problems."
        )
        + (" ANALYZE after each load (as autovacuum would)." if result.analyze else "")
    )
    steps = result.steps
    growth = Table(
        "Scale: the database grows (small wallets: one grant each)",
        ["operation (p50 ms)"] + [f"{s.wallets:,} wallets" for s in steps] + ["largest / smallest"],
    )
    for name in steps[0].small:
        first, last = steps[0].small[name].p50, steps[-1].small[name].p50
        growth.rows.append([name] + [ms(s.small[name].p50) for s in steps] + [f"{last / first:.2f}x"])
    growth.rows.append(["bulk load before the step (s)"] + [f"{s.load_seconds:.1f}" for s in steps] + [""])
    growth.notes.append(
        "Timed step by step as the database grows (so noise between steps shows); each step also adds the"
        " next big wallet."
    )
    one, many = scale.LOT_OPS
    lots = Table(
        "Scale: spend() and the wallet's emptied lots",
        ["operation (p50 ms)", "wallet of 1 lot", f"{result.emptied:,} emptied lots + 1", "ratio"],
    )
    lots.rows.append(
        [
            "spend 1",
            ms(result.lots[one].p50),
            ms(result.lots[many].p50),
            f"{result.lots[many].p50 / result.lots[one].p50:.2f}x",
        ]
    )
    lots.notes.append(
        f"The second wallet got {result.emptied:,} grants of 1 credit, all spent (lots emptied), then one"
        " big grant: its live lot is its newest. Finding the soonest-expiring lot with credits left walks"
        " the lots index, (wallet_id, expires_at, id), through every lot of the wallet and drops the"
        " emptied ones only after reading each row (remaining is not in the index); PostgreSQL's"
        " one-statement debit does it twice. Timed interleaved with the operations of the first table."
    )
    return [entries, growth, lots]


def checks(
    results: list[loads.LoadResult],
    inproc: web.WebResult,
    served: web.WebResult,
    rows: list[queries.QueryRow],
    grown: scale.ScaleResult,
    pg: bool,
    hooks: webhooks.WebhookResult,
) -> list[Check]:
    one, hot, many = results
    ref = "the one-statement floor" if pg else "the limit"
    # The issue sets the targets on PostgreSQL; SQLite's ratios are shown, not judged.
    out = [
        Check(f"spend >= {share:.0%} of {ref}, {r.load.name}", pct(r.ratio), r.ratio >= share if pg else None)
        for r, share in ((one, 0.8), (hot, 0.8), (many, 0.7))
    ]
    out += [
        Check(
            f"hold + settle >= 40% of {ref}, {r.load.name}",
            pct(r.hold_ratio),
            r.hold_ratio >= 0.4 if pg else None,
        )
        for r in results
    ]
    for r in results:
        best = r.best_peer
        if best is not None:
            factor = r.spend.throughput / best[1].throughput
            out.append(
                Check(
                    f"spend >= 2x the best peer ({best[0]}), {r.load.name}",
                    f"{factor:.2f}x",
                    factor >= 2 if pg else None,
                )
            )
    fulfil, duplicate = one.against(hooks.fulfil), one.against(hooks.duplicate)
    out.append(Check(f"webhook fulfilment >= 30% of {ref}", pct(fulfil), fulfil >= 0.3 if pg else None))
    out.append(Check(f"duplicate webhook >= 100% of {ref}", pct(duplicate), duplicate >= 1.0 if pg else None))
    by_name = {row.name: row.counts for row in rows}
    if pg:
        for name in ("hold", "settle below the hold"):
            trips = by_name[name].round_trips
            out.append(Check(f"{name}: one round trip", describe(by_name[name]), trips == 1))
    beside = by_name["spend next to a live hold"]
    out.append(
        Check(
            "spend() sends the same with a live hold in the wallet",
            describe(beside),
            same_work(beside, by_name["spend (fast path)"]),
        )
    )
    free, paid = (
        by_name["request POST /free (undecorated)"],
        by_name["request POST /paid (@requires_credits(1))"],
    )
    spend = by_name["spend (fast path)"]
    added = dataclasses.replace(
        paid,
        statements=paid.statements - free.statements,
        commits=paid.commits - free.commits,
        rollbacks=paid.rollbacks - free.rollbacks,
        round_trips=None if paid.round_trips is None else paid.round_trips - (free.round_trips or 0),
    )
    # One debit transaction: spend's own statements, ending in one COMMIT, or (PostgreSQL) its one
    # statement in autocommit, which is a transaction of its own.
    one_transaction = spend.commits == 1 or (spend.statements == 1 and spend.commits == 0)
    out.append(
        Check(
            "decorated request adds at most one debit transaction",
            f"+{describe(added)}"
            + (" = spend()'s own" if same_work(added, spend) else f" (spend: {describe(spend)})"),
            same_work(added, spend) and one_transaction,
        )
    )
    for label, result in (("in process", inproc), ("gunicorn", served)):
        ratio = result.target_ratio
        share = 0.8 if pg else 0.7
        out.append(
            Check(
                f"decorated >= {share:.0%} of undecorated + {'floor' if pg else 'limit'}, {label}",
                pct(ratio),
                ratio >= share,
            )
        )
    for name, timings in grown.big.items():
        if name.startswith("spend"):
            continue
        sizes = sorted(timings)
        factor = timings[sizes[-1]].p50 / timings[sizes[0]].p50
        out.append(
            Check(f"flat {sizes[0]:,} -> {sizes[-1]:,} entries: {name}", f"{factor:.2f}x", factor <= FLAT)
        )
    steps = grown.steps
    for name in steps[0].small:
        factor = steps[-1].small[name].p50 / steps[0].small[name].p50
        out.append(
            Check(
                f"flat {steps[0].wallets:,} -> {steps[-1].wallets:,} wallets: {name}",
                f"{factor:.2f}x",
                factor <= FLAT,
            )
        )
    return out
