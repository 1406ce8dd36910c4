import CloudInit
import Foundation
import Testing
import TestSupport
import Yams

@Suite("cloud-init seed")
struct SeedTests {
    static let seed = Seed(
        instanceID: "i-0123456789ab", hostname: "web-1", instanceName: "web-1", poolURL: "http://127.0.0.1:8080",
        sshKeys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx alice@laptop"], postCreate: "#!/bin/sh\necho ready > /run/marker\n",
        macAddress: "52:54:00:AB:CD:EF")

    @Test("each file renders as exact text")
    func exactText() throws {
        #expect(try Self.seed.metaData() == "instance-id: i-0123456789ab\nlocal-hostname: web-1\n")
        #expect(
            try Self.seed.networkConfig() == """
                version: 2
                ethernets:
                  primary:
                    match:
                      macaddress: 52:54:00:ab:cd:ef
                    dhcp4: true

                """)
        #expect(
            try Self.seed.cloudConfig() == """
                #cloud-config
                hostname: web-1
                final_message: 'corral: cloud-init finished after $UPTIME s of uptime'
                ssh_authorized_keys:
                - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx alice@laptop
                write_files:
                - path: /etc/corral/instance.env
                  owner: root:root
                  permissions: '0644'
                  content: |
                    CORRAL_INSTANCE='web-1'
                    CORRAL_POOL_URL='http://127.0.0.1:8080'

                """)
        #expect(
            try Self.seed.userData(boundary: "BOUNDARY") == """
                Content-Type: multipart/mixed; boundary="BOUNDARY"
                MIME-Version: 1.0

                --BOUNDARY
                Content-Type: text/cloud-config; charset="utf-8"
                MIME-Version: 1.0
                Content-Transfer-Encoding: 8bit
                Content-Disposition: attachment; filename="cloud-config.yaml"

                \(try Self.seed.cloudConfig())--BOUNDARY
                Content-Type: text/x-shellscript; charset="utf-8"
                MIME-Version: 1.0
                Content-Transfer-Encoding: 8bit
                Content-Disposition: attachment; filename="post-create.sh"

                #!/bin/sh
                echo ready > /run/marker
                --BOUNDARY--

                """)
    }

    @Test("post-create: a script, a cloud-config to merge, plain lines run by /bin/sh, nothing when empty")
    func postCreateKinds() throws {
        var seed = Self.seed
        seed.postCreate = "#cloud-config\npackages: [nginx]\n"
        #expect(seed.postCreatePart?.type == "text/cloud-config")
        #expect(try seed.userData(boundary: "B").contains("Merge-Type: dict(no_replace,recurse_list)+list(append)+str()\n\n#cloud-config\npackages: [nginx]\n"))
        seed.postCreate = "apt-get install -y nginx"
        #expect(seed.postCreatePart?.type == "text/x-shellscript")
        #expect(seed.postCreatePart?.text == "#!/bin/sh\napt-get install -y nginx")
        seed.postCreate = "  \n"
        #expect(seed.postCreatePart == nil)
        #expect(try seed.userData(boundary: "B").components(separatedBy: "--B\n").count == 2)
    }

    @Test("the owner's user-data is a part of its own after the wisp's: scripts run in that order, cloud-configs merge under ours")
    func ownUserData() throws {
        var seed = Self.seed
        seed.postCreate = "#!/bin/sh\necho wisp"
        seed.ownUserData = "#!/bin/bash\necho mine"
        let text = try seed.userData(boundary: "B")
        let wisp = try #require(text.range(of: "filename=\"post-create.sh\"\n\n#!/bin/sh\necho wisp\n"))
        let mine = try #require(text.range(of: "filename=\"user-data.sh\"\n\n#!/bin/bash\necho mine\n"))
        #expect(wisp.upperBound < mine.lowerBound)
        seed.ownUserData = "#cloud-config\nruncmd: [touch /tmp/x]\n"
        #expect(try seed.userData(boundary: "B").contains(
            "filename=\"user-data.yaml\"\nMerge-Type: dict(no_replace,recurse_list)+list(append)+str()\n\n#cloud-config\nruncmd: [touch /tmp/x]\n"))
        seed.ownUserData = ""
        #expect(try seed.userData(boundary: "B").components(separatedBy: "--B\n").count == 3)
    }

    @Test("keys, names and scripts cannot inject into our cloud-config or break the multipart")
    func injection() throws {
        let hostile = [
            "ssh-ed25519 AAAA x\nruncmd: [reboot]", "#cloud-config", "- ssh-rsa BBBB y", "key: value", "'quoted' \"double\"",
            "ssh-ed25519 AAAA z # comment", "&anchor *alias !!python/object",
        ]
        var seed = Self.seed
        seed.sshKeys = hostile
        seed.instanceName = "web'1\nCORRAL_POOL_URL=evil"
        seed.postCreate = "#!/bin/sh\necho --BOUNDARY\necho --BOUNDARY--\n"
        let config = try #require(try Yams.load(yaml: try seed.cloudConfig()) as? [String: Any])
        #expect(Set(config.keys) == ["hostname", "final_message", "ssh_authorized_keys", "write_files"])
        #expect((config["final_message"] as? String)?.hasPrefix(Seed.finishedMarker) == true)
        #expect(config["ssh_authorized_keys"] as? [String] == hostile)
        let files = try #require(config["write_files"] as? [[String: Any]])
        #expect(files.count == 1)
        #expect(files.first?["content"] as? String == "CORRAL_INSTANCE='web'\\''1\nCORRAL_POOL_URL=evil'\nCORRAL_POOL_URL='http://127.0.0.1:8080'\n")

        // The boundary asked for appears in a part, so another one is chosen.
        let userData = try seed.userData(boundary: "BOUNDARY")
        let boundary = try #require(userData.firstMatch(of: /boundary="([^"]+)"/)?.1)
        #expect(boundary != "BOUNDARY")
        #expect(userData.components(separatedBy: "--\(boundary)\n").count == 3)
        #expect(userData.hasSuffix("--\(boundary)--\n"))
    }

    @Test("our cloud-config passes `cloud-init schema`, with and without keys")
    func schema() async throws {
        let directory = try Paths.scratchDirectory("seed")
        defer { try? FileManager.default.removeItem(at: directory) }
        var bare = Self.seed
        bare.sshKeys = []
        for (index, seed) in [Self.seed, bare].enumerated() {
            let file = directory.appendingPathComponent("cloud-config-\(index).yaml")
            try seed.cloudConfig().write(to: file, atomically: true, encoding: .utf8)
            let result = try await runCommand(URL(fileURLWithPath: "/usr/bin/cloud-init"), ["schema", "--config-file", file.path])
            #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
            #expect(result.stdout.contains("Valid cloud-config"), "\(result.stdout)")
        }
        // The validator is real: a wrong type is reported.
        let broken = directory.appendingPathComponent("broken.yaml")
        try "#cloud-config\nssh_authorized_keys: 42\n".write(to: broken, atomically: true, encoding: .utf8)
        let refused = try await runCommand(URL(fileURLWithPath: "/usr/bin/cloud-init"), ["schema", "--config-file", broken.path])
        #expect(refused.status != 0)
    }

    @Test("the seed is written as a cidata ISO holding exactly the rendered files")
    func image() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("corral-seed-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("seed.iso").path
        try await Self.seed.writeImage(to: path)
        let header = try await runProgram("isoinfo", ["-d", "-i", path])
        #expect(header.stdout.contains("Volume id: cidata"))
        #expect(header.stdout.contains("Rock Ridge signatures version"))
        let listing = try await runProgram("isoinfo", ["-f", "-R", "-i", path])
        #expect(Set(listing.stdout.split(separator: "\n").map(String.init)) == ["/meta-data", "/network-config", "/user-data"])
        // The user-data inside is the one Seed renders (its boundary aside).
        let userData = try await runProgram("isoinfo", ["-R", "-i", path, "-x", "/user-data"])
        #expect(userData.stdout.contains(try Self.seed.cloudConfig()))
        let metaData = try await runProgram("isoinfo", ["-R", "-i", path, "-x", "/meta-data"])
        #expect(metaData.stdout == (try Self.seed.metaData()))
        #expect(!FileManager.default.fileExists(atPath: path + ".part"))
    }
}
