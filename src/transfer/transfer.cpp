// placeholder: the UCX transfer engine (being written)
