//! Unauthenticated writes that grow without bound: floods of refusals beside honest jobs.
