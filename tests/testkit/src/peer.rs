//! An in-memory AMQP 1.0 peer. (work in progress)
