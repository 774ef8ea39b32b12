//! Connections an attacker holds: slow and idle sockets, oversized headers and bodies, odd body shapes.
