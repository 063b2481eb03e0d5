# A file whose code raises while it is loaded.
settings = {}
application = settings["APPLICATION"]  # KeyError: the line the traceback must show
