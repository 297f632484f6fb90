//! The Luna Saver gateway service. Its implementation arrives with the distributed pipeline.
