import ArgumentParser
import Foundation
import Hummingbird
import Logging
import PoolAPI
import PoolController

extension Corral {
    struct Pool: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run and administer the pool controller.",
            subcommands: [
                Serve.self, Init.self, Users.self, Appliances.self, Flavors.self, Images.self, Wisps.self, Instances.self,
            ]
        )
    }
}

/// The pool database every `corral pool` command works on.
struct PoolDatabaseOptions: ParsableArguments {
    @Option(help: "The pool's SQLite database file.")
    var database: String = ProcessInfo.processInfo.environment["CORRAL_POOL_DATABASE"] ?? "/var/lib/corral/pool.sqlite"

    /// Opens the database, which must exist (admin commands never create
    /// one by accident, for example under a mistyped path).
    func openExisting() throws -> SQLiteStore {
        guard FileManager.default.fileExists(atPath: database) else {
            fail("no pool database at \(database): create it with `corral pool init --database \(database)`, or pass --database.")
        }
        return try open()
    }

    /// Opens the database, creating it when missing.
    func open() throws -> SQLiteStore {
        do {
            return try SQLiteStore(path: database)
        } catch let error as PoolError {
            fail("\(error)")
        }
    }
}

/// Runs an admin operation, turning the pool's errors into one line and exit 1.
func administer<T>(_ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch let error as PoolError {
        fail("\(error)")
    }
}

extension Corral.Pool {
    struct Serve: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Run the pool's HTTP server until SIGTERM or SIGINT.")

        @OptionGroup var store: PoolDatabaseOptions

        @Option(help: "The address to listen on.")
        var host = "127.0.0.1"

        @Option(help: "The port to listen on (0: any free port).")
        var port = 8080

        func validate() throws {
            guard (0...65535).contains(port) else { throw ValidationError("--port must be 0-65535 (it was \(port)).") }
        }

        func run() async throws {
            var logger = Logger(label: "corral.pool")
            logger.logLevel = .info
            let app = buildPoolApplication(
                configuration: PoolConfiguration(host: host, port: port), store: try store.open(), logger: logger
            ) { host, port in
                // One line on standard output, so scripts can find the port.
                FileHandle.standardOutput.write(Data("pool listening on http://\(host):\(port)\n".utf8))
            }
            try await app.runService()
        }
    }

    struct Init: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create the pool database (safe to repeat).")

        @OptionGroup var store: PoolDatabaseOptions

        func run() async throws {
            _ = try store.open()
            print("pool database ready at \(store.database)")
        }
    }

    struct Users: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "user", abstract: "Manage the pool's users.", subcommands: [Add.self, List.self])

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Create a user and print their API token, once, alone on standard output.")

            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The user's name.") var name: String
            @Flag(help: "May see and manage every instance.") var superuser = false
            @Option(help: "How many instances the user may hold at once.") var maxInstances = 10
            @Flag(help: "Print JSON.") var json = false

            func validate() throws {
                try validateName(name, field: "NAME")
                guard maxInstances >= 0 else {
                    throw ValidationError("--max-instances must be 0 or more (it was \(maxInstances)).")
                }
            }

            func run() async throws {
                let token = Token.generate()
                let user = try await administer {
                    try await store.openExisting().addUser(
                        name: name, superuser: superuser, maxInstances: maxInstances, tokenDigest: Token.digest(token))
                }
                if json { return try printJSON(["name": user.name, "token": token]) }
                print(token)
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List users (never their tokens).")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let users = try await administer { try await store.openExisting().users() }
                if json { return try printJSON(users) }
                var table = Table(header: ["NAME", "SUPERUSER", "MAX INSTANCES", "CREATED"])
                for user in users {
                    table.rows.append([
                        user.name, user.superuser ? "yes" : "no", "\(user.maxInstances)", user.createdAt.formatted(.iso8601),
                    ])
                }
                print(table.render())
            }
        }
    }

    struct Appliances: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "appliance", abstract: "Manage the appliances (agents) that may check in.",
            subcommands: [Add.self, List.self, Disable.self, Enable.self, RotateToken.self])

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Create an appliance and print its API token, once, alone on standard output.")

            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The appliance's name.") var name: String
            @Option(help: "The user who owns it.") var owner: String
            @Flag(help: "Print JSON.") var json = false

            func validate() throws { try validateName(name, field: "NAME") }

            func run() async throws {
                let token = Token.generate()
                let appliance = try await administer {
                    try await store.openExisting().addAppliance(name: name, owner: owner, tokenDigest: Token.digest(token))
                }
                if json { return try printJSON(["name": appliance.name, "owner": appliance.owner, "token": token]) }
                print(token)
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List appliances (never their tokens).")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let appliances = try await administer { try await store.openExisting().appliances() }
                if json { return try printJSON(appliances) }
                var table = Table(header: ["NAME", "OWNER", "ENABLED", "VERSION", "LAST SEEN"])
                for appliance in appliances {
                    table.rows.append([
                        appliance.name, appliance.owner, appliance.enabled ? "yes" : "no", appliance.version ?? "-",
                        appliance.lastSeen?.formatted(.iso8601) ?? "never",
                    ])
                }
                print(table.render())
            }
        }

        struct Disable: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Refuse the appliance's check-ins (409) until it is enabled again.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The appliance's name.") var name: String

            func run() async throws {
                _ = try await administer { try await store.openExisting().setAppliance(name, enabled: false) }
                print("appliance '\(name)' disabled")
            }
        }

        struct Enable: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Accept the appliance's check-ins again.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The appliance's name.") var name: String

            func run() async throws {
                _ = try await administer { try await store.openExisting().setAppliance(name, enabled: true) }
                print("appliance '\(name)' enabled")
            }
        }

        struct RotateToken: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "rotate-token",
                abstract: "Give the appliance a new token (printed once); the old one stops working at once.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The appliance's name.") var name: String

            func run() async throws {
                let token = Token.generate()
                try await administer {
                    try await store.openExisting().setApplianceToken(name, tokenDigest: Token.digest(token))
                }
                print(token)
            }
        }
    }

    struct Flavors: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "flavor", abstract: "Manage the flavor catalogue.", subcommands: [Add.self, List.self])

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Add a flavor (a size of instance).")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The flavor's name.") var name: String
            @Option(help: "Virtual CPUs.") var vcpus: Int
            @Option(help: "Memory in MiB.") var memoryMib: Int
            @Option(help: "Disk in GiB.") var diskGib: Int
            @Option(help: "Upload limit in Mbit/s (0: none).") var networkUp = 0
            @Option(help: "Download limit in Mbit/s (0: none).") var networkDown = 0
            @Option(help: "Asking price per hour.") var ask = 0
            @Option(help: "Pool's rate per hour.") var rate = 0
            @Option(help: "A line describing the flavor.") var description = ""

            func validate() throws {
                try validateName(name, field: "NAME")
                guard vcpus >= 1 else { throw ValidationError("--vcpus must be 1 or more (it was \(vcpus)).") }
                guard memoryMib >= 16 else { throw ValidationError("--memory-mib must be 16 or more (it was \(memoryMib)).") }
                guard diskGib >= 1 else { throw ValidationError("--disk-gib must be 1 or more (it was \(diskGib)).") }
                for (option, value) in [("--network-up", networkUp), ("--network-down", networkDown), ("--ask", ask), ("--rate", rate)]
                where value < 0 {
                    throw ValidationError("\(option) must be 0 or more (it was \(value)).")
                }
            }

            func run() async throws {
                let flavor = Flavor(
                    name: name, description: description, vcpus: vcpus, memory: memoryMib, disk: diskGib,
                    networkUp: networkUp, networkDown: networkDown, rate: rate, ask: ask)
                try await administer { try await store.openExisting().addFlavor(flavor) }
                print("flavor '\(name)' added")
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List the flavor catalogue.")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let flavors = try await administer { try await store.openExisting().flavors() }
                if json { return try printJSON(flavors) }
                var table = Table(header: ["NAME", "VCPUS", "MEMORY", "DISK", "ASK", "ACTIVE"])
                for flavor in flavors {
                    table.rows.append([
                        flavor.name, "\(flavor.vcpus)", "\(flavor.memory) MiB", "\(flavor.disk) GiB", "\(flavor.ask)",
                        flavor.active ? "yes" : "no",
                    ])
                }
                print(table.render())
            }
        }
    }
}

extension Corral.Pool {
    struct Images: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "image", abstract: "Manage the boot images.", subcommands: [Add.self, List.self])

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Add an image that appliances download by URL.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The image's name.") var name: String
            @Option(help: "Where appliances download it (http or https).") var url: String
            @Option(help: "The file's SHA-256 in hex; appliances refuse a file that does not match.") var sha256: String?
            @Option(help: "qcow2 or raw.") var diskFormat = "qcow2"

            func validate() throws {
                try validateName(name, field: "NAME")
                try validateHTTPURL(url, option: "--url")
                if let sha256, sha256.count != 64 || !sha256.allSatisfy(\.isHexDigit) {
                    throw ValidationError("--sha256 must be 64 hex digits (it was '\(sha256)').")
                }
                guard ["qcow2", "raw"].contains(diskFormat) else {
                    throw ValidationError("--disk-format must be qcow2 or raw (it was '\(diskFormat)').")
                }
            }

            func run() async throws {
                let image = Image(name: name, url: url, sha256: sha256?.lowercased(), diskFormat: diskFormat)
                try await administer { try await store.openExisting().addImage(image) }
                print("image '\(name)' added")
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List the images.")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let images = try await administer { try await store.openExisting().images() }
                if json { return try printJSON(images) }
                var table = Table(header: ["NAME", "FORMAT", "SHA256", "URL"])
                for image in images {
                    table.rows.append([image.name, image.diskFormat, image.sha256.map { String($0.prefix(12)) } ?? "-", image.url])
                }
                print(table.render())
            }
        }
    }

    struct Wisps: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "wisp", abstract: "Manage wisps: the image, SSH keys and script an instance boots with.",
            subcommands: [Add.self, List.self])

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Add a wisp.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The wisp's name.") var name: String
            @Option(help: "The user who owns it.") var owner: String
            @Option(help: "A catalogue image to boot.") var image: String?
            @Option(help: "Or: an image URL the appliance downloads itself.") var dynamicImageURL: String?
            @Option(help: "A file of SSH public keys, one per line (repeatable).") var sshKeyFile: [String] = []
            @Option(help: "A post-creation script (#!...) or cloud-config (#cloud-config) file.") var postCreateFile: String?
            @Option(help: "A URL the appliance asks for its start parameters instead.") var callbackURL: String?
            @Flag(help: "Make it the owner's default wisp.") var `default` = false
            @Flag(help: "Make it the pool's fallback for users without a default.") var systemDefault = false

            func validate() throws {
                try validateName(name, field: "NAME")
                guard (image == nil) != (dynamicImageURL == nil) else {
                    throw ValidationError("give exactly one of --image NAME or --dynamic-image-url URL.")
                }
                if let dynamicImageURL { try validateHTTPURL(dynamicImageURL, option: "--dynamic-image-url") }
                if let callbackURL { try validateHTTPURL(callbackURL, option: "--callback-url") }
            }

            func run() async throws {
                var keys: [String] = []
                for file in sshKeyFile {
                    guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
                        fail("cannot read --ssh-key-file \(file)")
                    }
                    keys += text.split(whereSeparator: \.isNewline).map(String.init).filter { !$0.trimmingCharacters(in: .whitespaces).isEmpty }
                }
                var postCreate = ""
                if let postCreateFile {
                    guard let text = try? String(contentsOfFile: postCreateFile, encoding: .utf8) else {
                        fail("cannot read --post-create-file \(postCreateFile)")
                    }
                    postCreate = text
                }
                let wisp = Wisp(
                    name: name, owner: owner, image: image, dynamicImageURL: dynamicImageURL, sshKeys: keys,
                    postCreate: postCreate, callbackURL: callbackURL, isDefault: self.default, isSystemDefault: systemDefault)
                try await administer { try await store.openExisting().addWisp(wisp) }
                print("wisp '\(name)' added")
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List the wisps.")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let wisps = try await administer { try await store.openExisting().wisps() }
                if json { return try printJSON(wisps) }
                var table = Table(header: ["NAME", "OWNER", "IMAGE", "SSH KEYS", "DEFAULT"])
                for wisp in wisps {
                    let scope = wisp.isSystemDefault ? "system" : wisp.isDefault ? "owner" : "-"
                    table.rows.append([wisp.name, wisp.owner, wisp.image ?? wisp.dynamicImageURL ?? "-", "\(wisp.sshKeys.count)", scope])
                }
                print(table.render())
            }
        }
    }

    struct Instances: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "instance", abstract: "Inspect the instances appliances report.", subcommands: [List.self])

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List the instances with their last report.")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let instances = try await administer { try await store.openExisting().instances() }
                if json { return try printJSON(instances) }
                var table = Table(header: ["NAME", "APPLIANCE", "OWNER", "STATE", "ADDRESSES", "UPDATED"])
                for instance in instances {
                    table.rows.append([
                        instance.name, instance.appliance, instance.owner, "\(instance.state.rawValue) \(instance.state)",
                        instance.ipAddresses.isEmpty ? "-" : instance.ipAddresses.map(\.address).joined(separator: ","),
                        instance.updatedAt.formatted(.iso8601),
                    ])
                }
                print(table.render())
            }
        }
    }
}

/// URLs the pool hands to appliances: http or https with a host.
func validateHTTPURL(_ text: String, option: String) throws {
    guard let url = URL(string: text), ["http", "https"].contains(url.scheme?.lowercased() ?? ""), url.host != nil else {
        throw ValidationError("\(option) must be an http or https URL (it was '\(text)').")
    }
}

/// Names of users, appliances and flavors: letters, digits, `.`, `_`, `-`.
func validateName(_ name: String, field: String) throws {
    let allowed = CharacterSet.alphanumerics.union(CharacterSet(charactersIn: "._-"))
    guard !name.isEmpty, name.count <= 64, name.unicodeScalars.allSatisfy(allowed.contains) else {
        throw ValidationError("\(field) must be 1-64 letters, digits, '.', '_' or '-' (it was '\(name)').")
    }
}
