"""Float32 struct-of-arrays geometry (rigid frames, quaternions), residue constants and all-atom
placement."""
