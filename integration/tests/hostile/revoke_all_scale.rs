//! Emergency revoke-all at scale: filters in SQL, paged, resumable.
