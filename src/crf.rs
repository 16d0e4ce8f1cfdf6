//! Dense CRF (method.md §6). Being written; see issue 4.
