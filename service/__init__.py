"""The control plane: a FastAPI app over a persistent SQL job queue that dispatches Ray jobs.

    main.py          create_app: settings, database, Ray (embedded head or CDSP_RAY_ADDRESS), loop
    settings.py      the one Settings object (CDSP_* environment variables)
    models.py, db.py, migrations/   tables, engines (SQLite WAL / PostgreSQL), Alembic
    states.py, store.py             the state machine and every query and compare-and-set
    dispatcher.py, reconciler.py, control.py   claim + submit, follow Ray and the run folder
    ray_jobs.py, ray_head.py        the Ray Jobs API client, the embedded local head (adopted after a restart)
    routes/, schemas.py, views.py, errors.py, auth.py, observability.py   the REST API
    client.py, commands.py, demo.py   the REST client verbs, `demo`
    cli.py                          the whole `cdsp` command tree

The app imports only `cdsp_core.spec`, `cdsp_core.runs`, `cdsp_core.data.layout` and
`cdsp_core.ray_head` (the one local Ray head launcher) of the method: no torch, no Ray API, never
`workers`. Only the CLI's `run` command reaches `cdsp_core.pipeline` or `workers.run`, inside it.
"""
