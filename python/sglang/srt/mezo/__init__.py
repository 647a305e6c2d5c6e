"""Internals of the MeZO trainer; the public API is `sglang.srt.mezo_trainer`."""
