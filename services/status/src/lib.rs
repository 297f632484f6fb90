//! The Luna Saver status service. Its implementation arrives with the distributed pipeline.
