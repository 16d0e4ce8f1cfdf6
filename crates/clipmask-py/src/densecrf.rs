//! `clipmask.densecrf`'s engine (pydensecrf's API): bound once the general CRF lands.
use pyo3::prelude::*;

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
