//! The Luna Saver saver service. Its implementation arrives with the distributed pipeline.
