"""The model: its interface and labels, getting and checking its file, stand-ins, INT8 copies."""
