//! Text the store cannot hold: NUL bytes, lone surrogates and over-long values beside honest jobs.
