/**
 * Run a script on every image of a project, as `QuPath script -p project.qpproj script.groovy`
 * does (without --save): args = [project.qpproj, script.groovy]. Each image's objects live in
 * data/<id>/fake-hierarchy.json (created by the fake saveImageData).
 */
import fake.FakeEntry
import fake.FakeHierarchy
import fake.FakeObject
import fake.FakeProject
import groovy.json.JsonSlurper
import java.nio.file.Paths
import qupath.lib.images.ImageData

def projectFile = Paths.get(args[0]).toAbsolutePath()
def script = new File(args[1])
def project = new JsonSlurper().parse(projectFile.toFile())
def fakeProject = new FakeProject(path: projectFile)
for (e in project.images) {
    def id = e.entryID.toString()
    def entry = new FakeEntry(id: id, imageName: e.imageName, projectDir: projectFile.getParent())
    def imageData = new ImageData()
    def stateFile = projectFile.getParent().resolve('data').resolve(id).resolve('fake-hierarchy.json').toFile()
    if (stateFile.exists()) {
        def state = new JsonSlurper().parse(stateFile)
        imageData.setImageType(ImageData.ImageType.valueOf(state.imageType))
        state.properties.each { k, v -> imageData.setProperty(k, v) }
        entry.saves = state.saves
        imageData.getHierarchy().root = FakeObject.fromMap(state.root)
    }
    def binding = new Binding()
    binding.setVariable('getProjectEntry', { -> entry })
    binding.setVariable('getProject', { -> fakeProject })
    binding.setVariable('getCurrentImageData', { -> imageData })
    new GroovyShell(this.class.classLoader, binding).evaluate(script)
}
