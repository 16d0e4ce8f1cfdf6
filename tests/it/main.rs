//! The integration tests, one binary (libtorch is linked once): the CLI end to end, parity
//! against the Python references in tests/python (pytorch-grad-cam, OpenCV, PIL, pydensecrf),
//! hostile inputs and fuzzing. `support` is the one helper module: fixtures, Python, the seeded
//! random number generator, running the binary and checking its errors.
mod support;

mod batching;
mod cams_storage;
mod crf_cli;
mod crf_general;
mod crf_parity;
mod crf_tensor;
mod docs;
mod ecosystem;
mod eval_compare;
mod eval_metrics;
mod eval_report;
mod formulations;
mod fp16_cli;
mod fuzz_inputs;
mod generate_cli;
mod guards;
mod hostile;
mod json_schemas;
mod label_parsers;
mod messages;
mod model_loading;
mod overlays;
mod parity;
mod pickle_fuzz;
mod planted_links;
mod prompts;
mod readme;
mod slurm;
mod sources;
mod status_cli;
mod tag_cli;
mod tagclip;
mod terminal;
