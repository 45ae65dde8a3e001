"""Ingestion: spool directories of JSON submissions, and SQLite result files, into the
database. `pipeline` runs the stages; `spool` owns the files; `transforms`, `validate`,
`offload` and `sinks` are the stages; `writer` is the one writer per database; `loader`
loads SQLite result files."""
