package fake

import java.nio.file.Path

class FakeProject {
    Path path
    Path getPath() { path }
}
