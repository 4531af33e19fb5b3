package fake

import java.nio.file.Path

class FakeEntry {
    String id
    String imageName
    Path projectDir
    int saves = 0
    String getID() { id }
    String getImageName() { imageName }
    void saveImageData(imageData) {
        saves++
        def state = [imageType: imageData.getImageType().name(), properties: imageData.propertyMap(),
                     saves: saves, root: imageData.getHierarchy().getRootObject().toMap()]
        def file = projectDir.resolve('data').resolve(id).resolve('fake-hierarchy.json').toFile()
        file.parentFile.mkdirs()
        file.text = groovy.json.JsonOutput.toJson(state)
    }
}
