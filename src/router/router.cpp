// placeholder: router (being written)
