from sglang.srt.mezo import X
